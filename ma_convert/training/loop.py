"""The router-finetuning loop on Accelerate: 1 CPU, 1 GPU or N GPUs with DDP, with resumable state.

Layout of ``output_dir``: ``checkpoints/step-N`` (Accelerate states, written atomically, the last two
kept), ``logs/`` (TensorBoard), ``model/`` (the exported model, with its card), ``results.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..card import conversion_card_info, render_model_card
from ..core.control import collect_aux_losses, force_expert, meta_attention_modules, routing_stats, set_routing_mode
from ..core.cost import cheapest_real_cost, model_real_cost
from ..core.objective import cosine_ramp, linear_ramp
from ..core.stats import RoutingStats
from ..hub import (
    OutputFolderError,
    atomic_directory,
    check_output_dir,
    foreign_entries,
    read_marker,
    terminate_as_interrupt,
    write_marker,
)
from ..sources import ModelSource, ModelSourceError, error_summary, resolve_source
from .data import build_datasets, describe_eval_text
from .objective import (
    distillation_loss,
    layerwise_transfer_loss,
    lm_loss,
    set_step_weights,
    set_transfer_capture,
    teacher_logits,
    transfer_loss,
)
from .params import LORA_MARK, add_lora, assert_only_routers_and_experts_train, freeze_all_but_routers_and_experts
from .recipe import Recipe


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """What Accelerate's save_state does not know: the step and whether routing went hard."""

    step: int = 0
    hard: bool = False
    before: dict = field(default_factory=dict)  # the evaluation before training, for the results and card
    history: list = field(default_factory=list)
    seconds: float = 0.0  # training time so far, across resumes
    skipped: int = 0  # updates skipped for a non-finite gradient
    cost_lambda: Optional[float] = None  # the dual variable of training.cost_target


def load_tokenizer_and_config(source: ModelSource):
    """The cheap part of the model: enough to check the data before any weight is read."""
    from ..convert import load_config, load_tokenizer

    config = load_config(source)
    tokenizer = load_tokenizer(source)
    if tokenizer is None or not _tokenizes_text(tokenizer):
        raise ModelSourceError(f"{source.location} has no usable tokenizer, and finetuning needs one to read the "
                               "text: save the base model's tokenizer into the folder")
    return tokenizer, config


def _tokenizes_text(tokenizer) -> bool:
    """Whether a tokenizer turns text into more than unknown or end-of-text tokens."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).input_ids
    return len(set(ids) - {tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) > 0


def load_model(recipe: Recipe, source: ModelSource):
    """The converted model for the recipe's model source (converted here unless it already is)."""
    from transformers import AutoModelForCausalLM

    from ..convert import convert
    from ..convert import load_model as load_original

    dtype = getattr(torch, recipe.model.dtype)
    if source.is_converted:
        return AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype)
    model = load_original(source, dtype=dtype)
    convert(model, base_model=source.name, policy=recipe.model.routing_policy(), **recipe.model.meta_attention)
    for module in meta_attention_modules(model):  # new routers start at the recipe's prior
        module.set_objective_weights(recipe.training.objective_weights(0.0), start_at_prior=True)
    return model


class BatchSource:
    """Micro-batches as a deterministic function of the global micro-step, so that a resumed run
    reads exactly what the interrupted one would have, on any number of processes: global
    micro-batch m is items [m * W * B, (m + 1) * W * B) of the data order, and process r takes its
    B of them. A list of blocks is shuffled anew each epoch; a stream is read in order (re-read
    from the start each epoch), and a resumed run skips what was consumed."""

    def __init__(self, blocks, batch_size: int, seed: int) -> None:
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._orders: dict[int, torch.Tensor] = {}
        self._stream, self._position = None, 0

    def _item(self, k: int) -> torch.Tensor:
        if not isinstance(self.blocks, list):
            return self._streamed(k)
        epoch, position = divmod(k, len(self.blocks))
        if epoch not in self._orders:  # one epoch's order at a time
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.blocks), generator=generator)}
        return self.blocks[int(self._orders[epoch][position])]

    def _streamed(self, k: int) -> torch.Tensor:
        """Item k of the stream read over and over; the items before it (other processes') are read and skipped."""
        if self._stream is None or k < self._position:
            self._stream, self._position = itertools.chain.from_iterable(itertools.repeat(self.blocks)), 0
        block = next(itertools.islice(self._stream, k - self._position, None))
        self._position = k + 1
        return block

    def batch(self, micro_step: int, rank: int, world: int) -> torch.Tensor:
        start = (micro_step * world + rank) * self.batch_size
        return torch.stack([self._item(k) for k in range(start, start + self.batch_size)])


def lr_schedule(optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warm-up + cosine decay to 0 over the routing steps. Attention-transfer steps before
    them (`expert_pretrain_steps`) get their own warm-up and a flat rate, so the routers still start
    from the whole schedule."""
    from transformers import get_cosine_schedule_with_warmup

    pre = t.expert_pretrain_steps
    routing = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.steps - pre).lr_lambdas[0]

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / (t.warmup_steps + 1)) if step < pre else routing(step - pre)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_groups(model, t) -> list[dict]:
    """The trainable parameters as optimizer groups: routers and experts at `lr`, LoRA matrices at
    `lora_lr` when it is set (the schedule scales both)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.lora_lr is None:
        return [{"params": [p for _, p in trainable], "lr": t.lr}]
    lora = [p for n, p in trainable if LORA_MARK in n]
    return [{"params": [p for n, p in trainable if LORA_MARK not in n], "lr": t.lr}, {"params": lora, "lr": t.lora_lr}]


def enable_gradient_checkpointing(model) -> None:
    """transformers' per-layer checkpointing, non-reentrant: the frozen embeddings need no gradient,
    and the routers' random draws are replayed (the RNG state is restored for the recomputation)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_routers_only(model) -> None:
    """Training mode for the Meta-Attention modules (posterior sampling, Gumbel routing) and eval
    mode for the frozen rest: the base model's own dropout would only add noise to the teacher and
    the student alike."""
    model.eval()
    for module in meta_attention_modules(model):
        module.train()
    for module in model.modules():  # transformers checkpoints a layer only in training mode; its children stay in eval
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


TRAIN_STATE_FILE = "train_state.json"
# What a run folder may hold; anything else in it was not written by ma-convert.
RUN_ENTRIES = ("checkpoints", "logs", "model", "results.json", "recipe.yaml")


class CheckpointError(RuntimeError):
    pass


def _load_checkpoint(accelerator, folder: Path, scheduler) -> TrainState:
    """Restore what `RouterFinetune.save_checkpoint` wrote; any other file in the folder is ignored, never loaded."""
    train_file = folder / TRAIN_STATE_FILE
    if not train_file.is_file():
        older = " (it was written by an older ma-convert, whose pickled state is not loaded)" if any(
            folder.glob("custom_checkpoint_*.pkl")) else ""
        raise CheckpointError(f"cannot resume from {folder}: it has no {TRAIN_STATE_FILE}{older}; "
                              "start over with --overwrite")
    foreign = foreign_entries(folder)
    if foreign:
        raise CheckpointError(f"cannot resume from {folder}: it holds files ma-convert did not write ({', '.join(foreign)}), "
                              "which are never loaded; remove them to resume")
    try:
        saved = json.loads(train_file.read_text())
        accelerator.load_state(str(folder))
        # Accelerate skips an RNG file it cannot read without a word; this one must load.
        rng = load_file(folder / f"rng_state_{accelerator.process_index}.safetensors")
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        scheduler.load_state_dict(saved["scheduler"])
        return TrainState(**saved["train"])
    except Exception as error:
        raise CheckpointError(f"cannot resume from {folder}: it is damaged or incomplete ({error_summary(error)}); "
                              "delete it to resume from an earlier checkpoint, or start over with --overwrite") from None


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = sorted((output_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def finetune(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, stop_after: Optional[int] = None,
             recipe_file: Optional[str | Path] = None) -> dict:
    """Run the recipe; returns the results (also written to output_dir/results.json).

    `recipe_file` is the YAML the recipe came from (never deleted or written over). `stop_after`
    ends the run after that many steps without exporting, as a kill would (tests).
    """
    with terminate_as_interrupt():  # SIGTERM cleans up like Ctrl-C: no half-written checkpoint stays
        run = RouterFinetune(recipe, resume=resume, overwrite=overwrite, recipe_file=recipe_file)
        run.setup()
        stopped = run.train(stop_after)
        return stopped if stopped is not None else run.export()


def prepare_output_dir(recipe: Recipe, source: ModelSource, resume: bool, overwrite: bool,
                       recipe_file: Optional[str | Path]) -> Path:
    """Check the run folder before anything heavy: never a source, never a folder with files
    ma-convert did not write; --resume needs one of our runs with a checkpoint."""
    out = Path(recipe.output_dir)
    data = [Path(spec) for spec in (recipe.data.source, recipe.data.eval_source) if spec and Path(spec).exists()]
    sources = [p for p in (source.local_path, recipe_file, *data) if p is not None]
    if resume:
        check_output_dir(out, overwrite=True, sources=sources)
        if read_marker(out) is None or latest_checkpoint(out) is None:
            raise CheckpointError(f"--resume: no checkpoint of an ma-convert run under {out / 'checkpoints'}")
        return out
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(f"{out} already exists; pass --resume to continue it or --overwrite to start over")
    return check_output_dir(out, overwrite, sources)


def check_budget(recipe: Recipe, modules) -> None:
    """A real-cost budget must be reachable at the training length, or dual ascent only inflates the
    cost weight."""
    t, length = recipe.training, recipe.data.seq_len
    if t.cost_unit != "real" or t.cost_target is None:
        return
    floor = cheapest_real_cost(modules, length)
    if t.cost_target <= floor:
        raise ValueError(
            f"training.cost_target={t.cost_target:g} (real cost) cannot be met at seq_len={length}: every token on "
            f"its cheapest expert already costs {floor:.3f} there (a window as long as the block is full attention); "
            "raise cost_target, train on longer blocks or use smaller windows")


def _start_accelerator(t, out: Path):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=t.mixed_precision, log_with=t.log_with, project_dir=str(out / "logs"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        # Each process would train alone and all would write the same output_dir.
        raise RuntimeError(f"WORLD_SIZE={world} but Accelerate sees one process; on CPUs launch with "
                           "ACCELERATE_USE_CPU=1 (torchrun) or `accelerate launch --cpu`")
    return accelerator


class RoutingSchedule:
    """What each step sets, from the recipe alone (no Accelerate): the phase, the routing mode, the
    cost weight and the router temperature. The routing schedules start after attention transfer."""

    def __init__(self, t) -> None:
        self.t = t
        self.routing_steps = t.steps - t.expert_pretrain_steps

    def routing_step(self, step: int) -> int:
        return max(0, step - self.t.expert_pretrain_steps)

    def pretrain(self, step: int) -> bool:
        """Attention transfer before routing: only the cheap experts train, on a forced-full pass."""
        return step < self.t.expert_pretrain_steps

    def transfer(self, step: int) -> bool:
        """The attention-transfer term joins the loss."""
        return step < self.t.transfer_steps

    def hard(self, step: int, already: bool) -> bool:
        return already or (self.t.hard_switch == "steps" and step >= self.t.hard_at_step)

    def cost_weight(self, step: int, dual: Optional[float]) -> float:
        """The ramp, or under a budget the dual variable (its start value until the first update)."""
        t = self.t
        if t.cost_target is None:
            ramp = cosine_ramp if t.cost_ramp == "cosine" else linear_ramp
            return ramp(self.routing_step(step), t.cost_ramp_steps, t.cost_lambda_start, t.cost_lambda_end)
        return t.cost_lambda_start if dual is None else dual

    def temperature(self, step: int) -> float:
        t = self.t
        return cosine_ramp(self.routing_step(step), max(self.routing_steps - 1, 1), t.temperature_start,
                           t.temperature_end)

    def dual_update(self, cost_weight: float, cost: float) -> float:
        """Dual ascent on the budget: the weight rises while the cost is over it (floored at 0)."""
        return max(0.0, cost_weight + self.t.cost_target_lr * (cost - self.t.cost_target))


class RouterFinetune:
    """The recipe as an object: `setup`, `train`, `evaluate`, `save_checkpoint`, `export`."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False, recipe_file=None) -> None:
        self.recipe, self.t, self.resume = recipe, recipe.training, resume
        self.source = resolve_source(recipe.model.source)
        self.out = prepare_output_dir(recipe, self.source, resume, overwrite, recipe_file)
        self.schedule = RoutingSchedule(self.t)
        self.state = TrainState()
        self.last_checkpoint: Optional[Path] = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Data, model, optimizer and the run folder; the routed and original perplexity before training."""
        from accelerate.utils import set_seed
        from transformers.utils import flatten_dict

        t, recipe = self.t, self.recipe
        self.tokenizer, config = load_tokenizer_and_config(self.source)
        self.accelerator = accelerator = _start_accelerator(t, self.out)
        set_seed(t.seed)
        train_blocks, self.eval_blocks = build_datasets(recipe.data, self.tokenizer, config.max_position_embeddings)
        self.batches = BatchSource(train_blocks, t.batch_size, t.seed)
        model = self._build_model()
        optimizer = torch.optim.AdamW(parameter_groups(model, t), weight_decay=t.weight_decay)
        # The scheduler stays out of prepare(): Accelerate would step it once per process per step,
        # running an N-GPU schedule N times too fast. It is checkpointed (as JSON) all the same.
        self.scheduler = lr_schedule(optimizer, t)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.inner = accelerator.unwrap_model(self.model)
        self._open_run_folder()
        if t.log_with:  # TensorBoard takes scalar hyperparameters only
            hparams = flatten_dict(asdict(recipe))
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            accelerator.init_trackers("router_finetune", config=hparams)
        if not self.resume:
            self.state.before = before = {"original": self.evaluate(forced="full")["perplexity"], "routed": self.evaluate()}
            accelerator.print(
                f"before: perplexity original (forced full) {before['original']:.2f}, "
                f"routed {before['routed']['perplexity']:.2f} at projected cost {before['routed']['projected_cost']:.2f}"
            )
        train_routers_only(self.inner)

    def _build_model(self):
        t = self.t
        model = load_model(self.recipe, self.source)
        check_budget(self.recipe, meta_attention_modules(model))
        self.base = model.config.meta_attention.get("base_model")
        freeze_all_but_routers_and_experts(model)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if t.lora:
            from ..adapters import adapter_for

            model = add_lora(model, adapter_for(model.config.model_type).lora_targets, t.lora_rank, t.lora_alpha)
        return model.to(self.accelerator.device)

    def _open_run_folder(self) -> None:
        """Resume: load the last checkpoint and drop what a killed run was writing. Else: the folder
        is written only once everything before has worked."""
        accelerator, out = self.accelerator, self.out
        if self.resume:
            self.last_checkpoint = folder = latest_checkpoint(out)
            self.state = _load_checkpoint(accelerator, folder, self.scheduler)
            accelerator.print(f"resumed from {folder} at step {self.state.step}")
            if accelerator.is_main_process:
                for partial in (out / "checkpoints").glob(".step-*.tmp"):
                    shutil.rmtree(partial, ignore_errors=True)
        elif accelerator.is_main_process:
            if out.exists():
                shutil.rmtree(out)  # checked by prepare_output_dir: an earlier run of ours
            out.mkdir(parents=True)
            write_marker(out, "run", RUN_ENTRIES)
            (out / "recipe.yaml").write_text(self.recipe.to_yaml())
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ training
    def train(self, stop_after: Optional[int] = None) -> Optional[dict]:
        """Steps until the recipe's last (or `stop_after`, which then checkpoints as a kill would and
        returns where it stopped)."""
        from tqdm.auto import tqdm

        t, state = self.t, self.state
        self.progress = tqdm(total=t.steps, initial=state.step, desc="router finetune",
                             disable=not self.accelerator.is_local_main_process)
        started = time.perf_counter() - state.seconds
        try:
            while state.step < t.steps and (stop_after is None or state.step < stop_after):
                record = self.train_step(state.step)
                state.seconds = time.perf_counter() - started
                state.history.append(record)
                self.accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state.step)
                self.progress.update(1)
                if state.step % t.eval_every == 0 or state.step == t.steps:
                    self._evaluate_and_switch()
                if state.step % t.save_every == 0 and state.step < t.steps:
                    self.save_checkpoint(self.out / "checkpoints" / f"step-{state.step:06d}")
        finally:
            self.progress.close()  # an error message then starts on a line of its own
        if stop_after is not None and state.step < t.steps:
            folder = self.out / "checkpoints" / f"step-{state.step:06d}"
            if self.last_checkpoint != folder:  # unless this step's checkpoint was just written
                self.save_checkpoint(folder)
            self.accelerator.end_training()
            return {"stopped_at": state.step, "checkpoint": str(self.last_checkpoint)}
        return None

    def _set_step(self, step: int) -> dict:
        """Routing mode, objective weights and capture for this step; returns what the record logs."""
        s, state, inner = self.schedule, self.state, self.inner
        state.hard = s.hard(step, state.hard)
        set_routing_mode(inner, "hard" if state.hard else "soft")
        cost_weight, temperature = s.cost_weight(step, state.cost_lambda), s.temperature(step)
        set_step_weights(inner, self.t.objective_weights(cost_weight), temperature=temperature,
                         cost_unit=self.t.cost_unit)
        set_transfer_capture(inner, s.transfer(step) or s.pretrain(step), heads=s.pretrain(step))
        return {"cost_lambda": cost_weight, "temperature": temperature}

    def train_step(self, step: int) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its history record."""
        t, accelerator = self.t, self.accelerator
        settings = self._set_step(step)
        pretrain = self.schedule.pretrain(step)
        step_loss, step_task = 0.0, 0.0
        for micro in range(t.grad_accum):
            ids = self.batches.batch(step * t.grad_accum + micro, accelerator.process_index,
                                     accelerator.num_processes).to(accelerator.device)
            loss, task = (self._transfer_loss if pretrain else self._routed_loss)(ids, step, micro)
            step_loss, step_task = step_loss + loss / t.grad_accum, step_task + task / t.grad_accum
        self._update(pretrain)
        # Logged losses are means over the processes, so N-GPU curves compare with 1-GPU ones.
        loss_mean, task_mean = accelerator.reduce(torch.stack([step_loss, step_task]), "mean").tolist()
        if pretrain:  # no routing ran: the loss is the attention-transfer loss, and there is no routing to log
            self.progress.set_postfix(transfer=f"{loss_mean:.3f}")
            return {"loss": loss_mean, "transfer": loss_mean, "expert_pretrain": 1.0}
        record = {"loss": loss_mean, "task": task_mean, **settings, **self._routing_record(ids.shape[1], settings)}
        self.progress.set_postfix(loss=f"{loss_mean:.3f}", cost=f"{record['projected_cost']:.2f}", hard=self.state.hard)
        return record

    def _transfer_loss(self, ids, step: int, micro: int):
        """Attention transfer: a forced-full pass (its logits unused) whose heads and outputs the cheap
        experts learn from."""
        with self.inner.disable_adapter() if self.t.lora else contextlib.nullcontext():
            teacher_logits(self.inner, ids, logits_to_keep=1)
        loss = layerwise_transfer_loss(self.inner)
        self._backward(loss, step, "attention-transfer loss")
        return loss.detach(), loss.detach()

    def _routed_loss(self, ids, step: int, micro: int):
        """Distillation (or next-token loss) plus the routers' ELBO terms and any transfer term."""
        t, inner = self.t, self.inner
        # The teacher pass first: the student's forward must be the last one, since the aux loss and
        # the routing stats are read from the modules afterwards.
        teacher = None
        if t.objective == "distill":
            with inner.disable_adapter() if t.lora else contextlib.nullcontext():  # the original has no LoRA
                teacher = teacher_logits(inner, ids)
        # DDP all-reduces the summed gradients once, in the step's last micro-batch.
        last = micro == t.grad_accum - 1
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
            logits = self.model(input_ids=ids).logits
            task = distillation_loss(logits, teacher, t.distill_temperature) if teacher is not None else lm_loss(logits, ids)
            loss = task + collect_aux_losses(inner)
            if self.schedule.transfer(step):
                loss = loss + t.transfer_weight * transfer_loss(inner)
            self._backward(loss, step)
        return loss.detach(), task.detach()

    def _backward(self, loss, step: int, what: str = "loss") -> None:
        """A micro-batch's backward pass; a non-finite loss stops training before the bad update."""
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the {what} is {loss.item()} in step {step + 1} (is the learning rate, {self.t.lr:g}, too high?): "
                f"training stopped before the bad update; the last good checkpoint is "
                f"{self.last_checkpoint or 'none (none was saved yet)'}"
            )
        self.accelerator.backward(loss / self.t.grad_accum)

    def _update(self, pretrain: bool) -> None:
        """Clip, step (or skip a non-finite gradient), schedule."""
        accelerator, model, state = self.accelerator, self.model, self.state
        if pretrain and accelerator.num_processes > 1:
            # The pass ran outside the DDP wrapper (no_grad teacher), so DDP did not average these gradients.
            for param in model.parameters():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, "mean")
        grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], self.t.max_grad_norm)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
            # A finite loss can still give a non-finite gradient (Dirichlet sampling at tiny
            # concentrations): skip the update rather than write NaN into the routers.
            self.optimizer.zero_grad()
            state.skipped += 1
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        state.step += 1

    def _routing_record(self, length: int, settings: dict) -> dict:
        """Routing statistics of the step's last micro-batch; under a budget, the dual update."""
        t, state = self.t, self.state
        stats = RoutingStats.aggregate(routing_stats(self.inner))
        # The last micro-batch's hard routes at its length (what `ma-convert eval` reports).
        real = model_real_cost(meta_attention_modules(self.inner), length, routes=True)
        if t.cost_target is not None:  # the cost averaged over the processes
            cost = real if t.cost_unit == "real" else stats.projected_cost
            cost = self.accelerator.reduce(torch.tensor(cost, device=self.accelerator.device), "mean").item()
            state.cost_lambda = self.schedule.dual_update(settings["cost_lambda"], cost)
        return {"projected_cost": stats.projected_cost, "real_cost": real, "entropy": stats.entropy,
                "hard": float(state.hard)}

    # ------------------------------------------------------------------ evaluation, checkpoints, export
    @torch.no_grad()
    def evaluate(self, forced: Optional[str] = None) -> dict:
        """Perplexity over the eval blocks (routed, or forced to one expert) and the routing stats."""
        inner, accelerator, batch_size = self.inner, self.accelerator, self.t.batch_size
        was_training = any(m.training for m in meta_attention_modules(inner))
        inner.eval()
        mine = self.eval_blocks[accelerator.process_index :: accelerator.num_processes]
        total, count, layers = torch.zeros((), dtype=torch.float64), 0, None
        for i in range(0, len(mine), batch_size):
            ids = torch.stack(mine[i : i + batch_size]).to(accelerator.device)
            if forced is not None:
                with force_expert(inner, forced):
                    logits = inner(input_ids=ids).logits
            else:
                logits = inner(input_ids=ids).logits
                stats = routing_stats(inner)
                layers = stats if layers is None else [a + b for a, b in zip(layers, stats)]
            total += lm_loss(logits, ids).double().cpu() * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
        sums = accelerator.reduce(torch.tensor([total.item(), float(count)], device=accelerator.device), "sum")
        if was_training:
            train_routers_only(inner)
        result = {"perplexity": math.exp(sums[0].item() / max(sums[1].item(), 1.0))}
        if layers is not None:
            # Each process saw its share of the eval blocks: the statistics are sums, so they add up.
            layers = [RoutingStats(accelerator.reduce(s._sums, "sum"), s.costs) for s in layers]
            overall = RoutingStats.aggregate(layers)
            result.update(
                layer_stats=[s.to_dict() for s in layers],
                projected_cost=overall.projected_cost,
                entropy=overall.entropy,
                mean_uncertainty=overall.mean_uncertainty,
                expert_fractions=overall.expert_fractions,
            )
        return result

    def _evaluate_and_switch(self) -> None:
        """Log an evaluation; the "entropy" and "uncertainty" soft-to-hard switches read it."""
        t, state = self.t, self.state
        result = self.evaluate()
        per_layer = {f"eval/layer_{i:02d}/{k}": layer[k] for i, layer in enumerate(result["layer_stats"])
                     for k in ("projected_cost", "entropy")}
        self.accelerator.log({"eval/perplexity": result["perplexity"], "eval/projected_cost": result["projected_cost"],
                              "eval/entropy": result["entropy"], **per_layer}, step=state.step)
        if t.hard_switch == "entropy" and result["entropy"] < t.hard_below_entropy:
            state.hard = True
        if t.hard_switch == "uncertainty" and result["mean_uncertainty"] < t.hard_below_uncertainty:
            state.hard = True

    def save_checkpoint(self, folder: Path) -> Path:
        """A checkpoint with nothing that needs unpickling to resume: Accelerate's model (safetensors),
        optimizer and RNG states (loaded with weights_only=True), and the step, history and LR schedule
        as JSON. Written into a temporary folder renamed into place; all but the last two pruned."""
        accelerator = self.accelerator
        tmp = folder.parent / f".{folder.name}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            rng = {"cpu": torch.get_rng_state()}  # the generators routing samples from (Dirichlet and Gumbel noise)
            if torch.cuda.is_available():
                rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, tmp / f"rng_state_{accelerator.process_index}.safetensors")
            if accelerator.is_main_process:
                train_state = {"train": asdict(self.state), "scheduler": self.scheduler.state_dict()}
                (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_marker(tmp, "checkpoint", (p.name for p in tmp.iterdir()))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if accelerator.is_main_process:
            tmp.rename(folder)
            for old in sorted(folder.parent.glob("step-*"))[:-2]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        self.last_checkpoint = folder
        return folder

    def export(self) -> dict:
        """Set the final routing mode, measure, write the model folder and results.json; return the results."""
        t, inner, accelerator = self.t, self.inner, self.accelerator
        set_routing_mode(inner, t.final_routing, uncertainty_threshold=t.uncertainty_threshold,
                         full_tail=t.final_full_tail)
        results = self._results(self.evaluate())
        assert_only_routers_and_experts_train(inner, lora=t.lora)
        if accelerator.is_main_process:
            self._save_model(inner.merge_and_unload() if t.lora else inner, results)
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return results

    def _results(self, after: dict) -> dict:
        before, state = self.state.before, self.state
        return {
            "base_model": self.base,
            "eval_tokens": sum(block.numel() for block in self.eval_blocks),
            "trainable_parameters": sum(p.numel() for p in self.inner.parameters() if p.requires_grad),
            "steps": self.t.steps,
            "skipped_updates": state.skipped,
            "train_seconds": state.seconds,
            "perplexity": {
                "original": before["original"],
                "routed, before finetune": before["routed"]["perplexity"],
                "routed, after finetune": after["perplexity"],
            },
            "projected_cost": {"before": before["routed"]["projected_cost"], "after": after["projected_cost"]},
            "entropy": after["entropy"],
            "expert_fractions": after["expert_fractions"],
            "layer_stats": after["layer_stats"],
            "history": state.history,
        }

    def _save_model(self, model, results: dict) -> None:
        """The finetuned model (its config records the trained router temperature, and its routing
        policy as the one it loads with), its tokenizer, the recipe and the model card, in output_dir/model."""
        module = meta_attention_modules(model)[0]
        block = dict(model.config.meta_attention)
        block["attention"] = dict(block["attention"], temperature=float(module.router.temperature))
        block["policy"] = module.policy.to_dict()
        model.config.meta_attention = block
        card = conversion_card_info(model, self.source)
        if self.source.is_converted:  # finetuned again: the base is the one its conversion recorded
            card["base_model"] = results["base_model"] or card["base_model"]
        card.update(
            recipe_yaml=self.recipe.to_yaml(),
            layer_stats=results["layer_stats"],
            perplexity=results["perplexity"],
            perplexity_text=describe_eval_text(self.recipe.data, results["eval_tokens"]),
            projected_cost=results["projected_cost"]["after"],
        )
        with atomic_directory(self.out / "model", overwrite=True) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "recipe.yaml").write_text(self.recipe.to_yaml())
            render_model_card(tmp, card)
