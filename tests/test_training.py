"""The router-finetuning recipe on a tiny model: only routers and experts train, resume is exact,
a NaN stops the run cleanly, bad recipes fail before anything heavy."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_llama
from transformers import LlamaForCausalLM

from ma_convert.training import objective
from ma_convert.training.loop import NonFiniteLossError, finetune
from ma_convert.training.recipe import Recipe


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny original (unconverted) LLaMA with a tokenizer, saved as a folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def recipe(source, out, **training):
    return Recipe.from_dict({
        "output_dir": str(out),
        "model": {"source": str(source), "meta_attention": {"window_size": 8}},
        "data": {"source": "pydoc", "seq_len": 32, "max_train_tokens": 2048, "max_eval_tokens": 256},
        "training": {"steps": 6, "batch_size": 2, "eval_every": 3, "save_every": 2, "warmup_steps": 1,
                     "transfer_steps": 2, "hard_at_step": 4, "log_with": None, **training},
    })


def meta_weights(folder):
    return {k: v for k, v in load_file(folder / "model" / "model.safetensors").items() if ".meta." in k}


def test_finetune_trains_only_routers_and_experts(source, tmp_path):
    results = finetune(recipe(source, tmp_path / "run", log_with="tensorboard"))
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    for name, tensor in original.items():  # base weights are bit-identical
        assert torch.equal(saved[name], tensor), name
    fresh = finetune(recipe(source, tmp_path / "no-steps", steps=1, lr=1e-12))
    moved = [k for k, v in meta_weights(tmp_path / "run").items() if not torch.equal(v, meta_weights(tmp_path / "no-steps")[k])]
    assert moved, "no router or expert weight changed"
    assert set(results["perplexity"]) == {"original", "routed, before finetune", "routed, after finetune"}
    assert len(results["history"]) == 6 and results["history"][-1]["hard"] == 1.0
    assert 0 < results["projected_cost"]["after"] <= 1.45
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["meta_attention"]["policy"]["mode"] == "hard"
    assert any((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    assert (tmp_path / "run" / "model" / "recipe.yaml").exists()
    del fresh


def test_killed_and_resumed_run_ends_with_the_same_weights(source, tmp_path):
    finetune(recipe(source, tmp_path / "straight"))
    stopped = finetune(recipe(source, tmp_path / "killed"), stop_after=3)
    assert stopped["stopped_at"] == 3
    finetune(recipe(source, tmp_path / "killed"), resume=True)
    a, b = meta_weights(tmp_path / "straight"), meta_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight, resumed = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("straight", "killed"))
    assert resumed["perplexity"] == straight["perplexity"]  # the "before" numbers survive the kill
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_stopping_on_a_checkpoint_step_and_the_final_temperature(source, tmp_path):
    assert finetune(recipe(source, tmp_path / "run", temperature_start=2.0, temperature_end=0.5), stop_after=2)["stopped_at"] == 2
    finetune(recipe(source, tmp_path / "run", temperature_start=2.0, temperature_end=0.5, final_full_tail=16), resume=True)
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["meta_attention"]["attention"]["temperature"] == pytest.approx(0.5)
    assert config["meta_attention"]["policy"]["full_tail"] == 16  # the saved policy: generated tokens go full


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(source, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = objective.distillation_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr("ma_convert.training.loop.distillation_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"nan in step 5.*step-000004"):
        finetune(recipe(source, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "step-000004").is_dir()
    assert not (tmp_path / "run" / "model").exists()


def test_a_non_finite_gradient_skips_the_update(source, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (Dirichlet sampling at tiny concentrations did this on
    SmolLM2) skips that update instead of writing NaN into the routers."""

    class NanGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    calls = {"n": 0}
    real = objective.distillation_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return NanGradient.apply(loss) if calls["n"] == 3 else loss

    monkeypatch.setattr("ma_convert.training.loop.distillation_loss", poisoned)
    results = finetune(recipe(source, tmp_path / "run"))
    assert results["skipped_updates"] == 1
    assert all(torch.isfinite(v).all() for v in meta_weights(tmp_path / "run").values())


def test_existing_output_and_missing_checkpoint(source, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(recipe(source, tmp_path / "run"))
    with pytest.raises(FileExistsError, match="did not write"):  # not a run of ours: never resumed into
        finetune(recipe(source, tmp_path / "run"), resume=True)
    with pytest.raises(FileExistsError, match="did not write"):  # nor deleted
        finetune(recipe(source, tmp_path / "run"), overwrite=True)
    assert (tmp_path / "run" / "something").read_text() == "x"
    with pytest.raises(RuntimeError, match="no checkpoint"):
        finetune(recipe(source, tmp_path / "empty"), resume=True)


def test_bad_recipes_name_the_problem(source, tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\): stpes \(did you mean steps\?\)"):
        Recipe.from_dict({"training": {"stpes": 3}})
    with pytest.raises(ValueError, match=r"unknown key\(s\): trainig"):
        Recipe.from_dict({"trainig": {}})
    with pytest.raises(ValueError, match=r"training.lr=-1"):
        Recipe.from_dict({"training": {"lr": -1}})
    with pytest.raises(ValueError, match="uncertainty_threshold"):
        Recipe.from_dict({"training": {"final_routing": "auto"}})
    with pytest.raises(ValueError, match="uncertainty_threshold"):
        Recipe.from_dict({"training": {"uncertainty_threshold": 7}})
    with pytest.raises(ValueError, match="hard_below_entropy='0.3'"):
        Recipe.from_dict({"training": {"hard_below_entropy": "0.3"}})
    with pytest.raises(ValueError, match="steps=True"):
        Recipe.from_dict({"training": {"steps": True}})
    with pytest.raises(ValueError, match=r"model.meta_attention.*window_sise \(did you mean window_size\?\)"):
        Recipe.from_dict({"model": {"meta_attention": {"window_sise": 8}}})
    with pytest.raises(ValueError, match="final_full_tail=-1"):
        Recipe.from_dict({"training": {"final_full_tail": -1}})
    with pytest.raises(ValueError, match="training.gumbel_temp=0"):
        Recipe.from_dict({"training": {"gumbel_temp": 0}})
    with pytest.raises(ValueError, match="training.sample_posterior='no'"):
        Recipe.from_dict({"training": {"sample_posterior": "no"}})
    with pytest.raises(ValueError, match="training.entropy_coeff=inf"):
        Recipe.from_dict({"training": {"entropy_coeff": float("inf")}})
    with pytest.raises(ValueError, match=r"model.meta_attention: \['sample_posterior'\] .* set them in the training"):
        Recipe.from_dict({"model": {"meta_attention": {"sample_posterior": False}}})
    with pytest.raises(ValueError, match=r"model.meta_attention: \['dense_below'\] .* set them in model.policy"):
        Recipe.from_dict({"model": {"meta_attention": {"dense_below": 0}}})
    with pytest.raises(ValueError, match=r"model.policy: RoutingPolicy.full_tail=-1 is invalid"):
        Recipe.from_dict({"model": {"policy": {"full_tail": -1}}})
    with pytest.raises(ValueError, match=r"model.policy: RoutingPolicy has no field\(s\) \['tail'\]"):
        Recipe.from_dict({"model": {"policy": {"tail": 1}}})
    with pytest.raises(ValueError, match="cost_target=1.5"):
        Recipe.from_dict({"training": {"cost_target": 1.5}})
    with pytest.raises(ValueError, match="cost_target_lr=0"):
        Recipe.from_dict({"training": {"cost_target": 0.3, "cost_target_lr": 0}})
    too_long = recipe(source, tmp_path / "long")
    too_long.data.seq_len = 512  # the tiny model has 128 positions
    with pytest.raises(ValueError, match="128"):
        finetune(too_long)
    assert not (tmp_path / "long" / "model").exists()


def test_demo_recipe_file_parses():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "smollm2_demo.yaml"
    parsed = Recipe.from_yaml(path)
    assert parsed.model.source == "smollm2" and parsed.training.steps > 0
    from ma_convert.training.recipe import DEMO_RECIPE_YAML, demo_recipe

    assert path.read_text() == DEMO_RECIPE_YAML  # the file users read is the recipe the demo runs
    assert demo_recipe(parsed.output_dir) == parsed


def test_lora_on_the_projections_is_merged_on_export(source, tmp_path):
    finetune(recipe(source, tmp_path / "lora", lora=True, lora_rank=4, steps=4, lr=1e-2))
    saved = load_file(tmp_path / "lora" / "model" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    assert not any("lora_" in k for k in saved)
    projections = [k for k in original if ".self_attn." in k]
    assert projections and all(not torch.equal(saved[k], original[k]) for k in projections if k.endswith("q_proj.weight"))
    assert all(torch.equal(saved[k], original[k]) for k in original if ".self_attn." not in k)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")  # a plain converted model again


def test_lora_learning_rate_is_its_own_parameter_group(source, tmp_path):
    from ma_convert.training.loop import parameter_groups
    from ma_convert.training.params import add_lora, freeze_all_but_routers_and_experts
    from ma_convert.training.recipe import TrainingConfig

    with pytest.raises(ValueError, match="lora_lr"):
        TrainingConfig(lora_lr=0)
    r = recipe(source, tmp_path / "groups", lora=True, lora_rank=4, lr=1e-2, lora_lr=1e-4)
    from ma_convert.sources import resolve_source
    from ma_convert.training.loop import load_model

    model = load_model(r, resolve_source(r.model.source))
    freeze_all_but_routers_and_experts(model)
    model = add_lora(model, r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)", 4, 8)
    meta, lora = parameter_groups(model, r.training)
    assert (meta["lr"], lora["lr"]) == (1e-2, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert lora["params"] and all("lora_" in names[id(p)] for p in lora["params"])
    assert meta["params"] and all(".meta." in names[id(p)] for p in meta["params"])
    (single,) = parameter_groups(model, recipe(source, tmp_path / "one", lora=True, lr=1e-2).training)
    assert single["lr"] == 1e-2 and len(single["params"]) == len(meta["params"]) + len(lora["params"])


def test_streaming_data_and_uncertainty_switch_resume_exactly(source, tmp_path):
    def streamed(out):
        r = recipe(source, out, hard_switch="uncertainty", hard_below_uncertainty=1.0, eval_every=2)
        r.data.streaming = True
        return r

    finetune(streamed(tmp_path / "straight"))
    finetune(streamed(tmp_path / "killed"), stop_after=3)
    results = finetune(streamed(tmp_path / "killed"), resume=True)
    assert results["history"][-1]["hard"] == 1.0  # the uncertainty switch fired at the first eval
    a, b = meta_weights(tmp_path / "straight"), meta_weights(tmp_path / "killed")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def softmax_router_recipe(source, out, **training):
    """The prior-free router starts uniform, so its hard routes cost more than a tiny budget."""
    r = recipe(source, out, **training)
    r.model.meta_attention["router"] = "softmax"
    return r


def test_cost_target_is_dual_ascent_on_the_cost_weight_and_resumes_exactly(source, tmp_path):
    settings = dict(cost_target=0.2, cost_target_lr=0.5, cost_lambda_start=0.01, steps=8)
    history = finetune(softmax_router_recipe(source, tmp_path / "run", **settings))["history"]
    assert history[0]["cost_lambda"] == 0.01  # the start value, not the ramp's
    for now, after in zip(history, history[1:]):  # the budget is enforced by the update rule itself
        expected = max(0.0, now["cost_lambda"] + 0.5 * (now["projected_cost"] - 0.2))
        assert after["cost_lambda"] == pytest.approx(expected, abs=1e-6)
    assert len({round(r["cost_lambda"], 6) for r in history}) > 2  # it moved with the measured cost
    finetune(softmax_router_recipe(source, tmp_path / "killed", **settings), stop_after=3)
    resumed = finetune(softmax_router_recipe(source, tmp_path / "killed", **settings), resume=True)["history"]
    assert [r["cost_lambda"] for r in resumed] == pytest.approx([r["cost_lambda"] for r in history], abs=1e-9)


def test_a_real_cost_budget_is_dual_ascent_on_the_real_cost(source, tmp_path):
    """cost_unit="real": the cost term charges each token its expert's work at its position, and the
    budget follows the real cost of the hard routes, which every step logs."""
    # 32-token blocks, window 8: the cheapest routing costs 0.60 of full attention here.
    settings = dict(cost_target=0.7, cost_target_lr=0.5, cost_lambda_start=0.01, steps=6, cost_unit="real")
    history = finetune(softmax_router_recipe(source, tmp_path / "run", **settings))["history"]
    for now, after in zip(history, history[1:]):
        expected = max(0.0, now["cost_lambda"] + 0.5 * (now["real_cost"] - 0.7))
        assert after["cost_lambda"] == pytest.approx(expected, abs=1e-6)
    assert all(0 < r["real_cost"] and r["real_cost"] != r["projected_cost"] for r in history)
    with pytest.raises(ValueError, match="cost_unit='pairs'"):
        Recipe.from_dict({"training": {"cost_unit": "pairs"}})


def test_an_unreachable_real_cost_budget_is_refused_before_training(source, tmp_path):
    """Windows as long as the blocks cost what full attention costs: no routing can meet the budget."""
    r = softmax_router_recipe(source, tmp_path / "run", cost_target=0.05, cost_unit="real", steps=2)
    with pytest.raises(ValueError, match=r"cost_target=0.05 \(real cost\) cannot be met at seq_len="):
        finetune(r)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cost_target_pulls_routing_to_the_budget(source, tmp_path):
    """Without a price, distillation keeps routing costly; a budget far below drives the projected cost
    down towards it."""
    common = dict(steps=30, lr=3e-2, hard_at_step=30, transfer_steps=0, eval_every=30, save_every=31)
    free = finetune(softmax_router_recipe(source, tmp_path / "free", cost_lambda_end=0.0, **common))["history"]
    budget = finetune(softmax_router_recipe(source, tmp_path / "budget", cost_target=0.2, cost_target_lr=0.5, **common))["history"]
    tail = lambda h: sum(r["projected_cost"] for r in h[-5:]) / 5  # noqa: E731
    assert tail(budget) < tail(free) - 0.1
    assert tail(budget) < 0.35


def test_layerwise_attention_transfer_trains_only_the_cheap_experts(source):
    """The loss re-runs each trainable cheap expert on the heads of a forced-full pass: gradients
    reach the Hedgehog maps only, and a few steps on one batch bring the linear expert closer to full."""
    import ma_convert
    from ma_convert.core.control import meta_attention_modules

    model = ma_convert.convert(LlamaForCausalLM.from_pretrained(source), window_size=8).train()
    for name, param in model.named_parameters():
        param.requires_grad_(".meta." in name)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(8):
        objective.set_transfer_capture(model, True, heads=True)
        objective.teacher_logits(model, ids)
        loss = objective.layerwise_transfer_loss(model)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert with_grad and all(".experts.1." in n for n in with_grad), with_grad  # the linear expert only
        optimizer.step()
        losses.append(loss.item())
    assert 0 < losses[-1] < 0.9 * losses[0]
    objective.set_transfer_capture(model, False)
    assert all(m.last_heads is None and not m.capture_heads for m in meta_attention_modules(model))


def test_expert_pretrain_steps_come_before_routing(source, tmp_path):
    results = finetune(recipe(source, tmp_path / "run", steps=5, expert_pretrain_steps=3, transfer_steps=0,
                              hard_at_step=5))
    history = results["history"]
    assert [r.get("expert_pretrain", 0.0) for r in history] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert all(r["transfer"] > 0 for r in history[:3]) and "projected_cost" not in history[0]
    assert all("projected_cost" in r for r in history[3:])
    with pytest.raises(ValueError, match="expert_pretrain_steps"):
        recipe(source, tmp_path / "bad", steps=3, expert_pretrain_steps=3)


def test_routing_schedules_start_after_attention_transfer():
    """Without transfer steps the learning rate follows transformers' cosine-with-warm-up schedule; with
    them, the routing phase still gets the whole schedule (warm-up from 0, decay to 0)."""
    from transformers import get_cosine_schedule_with_warmup

    from ma_convert.training.loop import lr_schedule
    from ma_convert.training.recipe import TrainingConfig

    def lr_factor(step, t):
        return lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), t).lr_lambdas[0](step)

    plain = TrainingConfig(steps=40, warmup_steps=5, hard_at_step=30)
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 5, 40)
    expected = [reference.lr_lambdas[0](s) for s in range(40)]
    assert [lr_factor(s, plain) for s in range(40)] == pytest.approx(expected, abs=1e-12)
    staged = TrainingConfig(steps=50, warmup_steps=5, hard_at_step=40, expert_pretrain_steps=10)
    assert [lr_factor(s, staged) for s in range(10, 50)] == pytest.approx(expected, abs=1e-12)
    assert 0 < lr_factor(0, staged) <= lr_factor(9, staged) == 1.0  # transfer: own warm-up, then flat
    with pytest.raises(ValueError, match="hard_at_step"):
        TrainingConfig(steps=50, hard_at_step=5, expert_pretrain_steps=10)


def test_gradient_accumulation_syncs_once_per_step(source, tmp_path, monkeypatch):
    """Under DDP the micro-batches before a step's last skip the all-reduce (accelerator.no_sync)."""
    from ma_convert.training import loop

    calls = []
    start = loop._start_accelerator

    def counting(*args, **kwargs):
        accelerator = start(*args, **kwargs)
        original = accelerator.no_sync

        def no_sync(model):
            calls.append(model)
            return original(model)

        accelerator.no_sync = no_sync
        return accelerator

    monkeypatch.setattr(loop, "_start_accelerator", counting)
    finetune(recipe(source, tmp_path / "run", steps=2, grad_accum=3, transfer_steps=0, hard_at_step=2))
    assert len(calls) == 2 * (3 - 1)


def test_routing_schedule_without_accelerate():
    """The per-step settings follow the recipe alone: attention transfer first, then the routing
    schedules from their start; the steps switch to hard routing; dual ascent moves the cost weight."""
    from ma_convert.training.loop import RoutingSchedule
    from ma_convert.training.recipe import TrainingConfig

    t = TrainingConfig(steps=30, expert_pretrain_steps=10, transfer_steps=12, hard_at_step=25, cost_lambda_start=0.0,
                       cost_lambda_end=0.2, cost_ramp_steps=10, cost_ramp="linear", temperature_start=2.0,
                       temperature_end=1.0)
    s = RoutingSchedule(t)
    assert [s.pretrain(k) for k in (0, 9, 10)] == [True, True, False]
    assert [s.transfer(k) for k in (11, 12)] == [True, False]
    assert [s.hard(k, False) for k in (24, 25)] == [False, True] and s.hard(0, True)
    assert s.cost_weight(10, None) == 0.0 and s.cost_weight(15, None) == pytest.approx(0.1)
    assert s.cost_weight(25, None) == pytest.approx(0.2)
    assert s.temperature(10) == 2.0 and s.temperature(29) == pytest.approx(1.0)
    budget = RoutingSchedule(TrainingConfig(steps=30, hard_at_step=25, cost_target=0.3, cost_target_lr=0.5,
                                            cost_lambda_start=0.05))
    assert budget.cost_weight(3, None) == 0.05 and budget.cost_weight(3, 0.2) == 0.2
    assert budget.dual_update(0.2, 0.5) == pytest.approx(0.3) and budget.dual_update(0.01, 0.1) == 0.0


def test_the_recipe_sets_every_objective_weight(source, tmp_path):
    """The routers' objective weights come from the recipe's training section, not from the model; the
    model's policy from its model section."""
    from ma_convert import ObjectiveWeights, RoutingPolicy
    from ma_convert.core.control import meta_attention_modules
    from ma_convert.training.loop import RouterFinetune

    chosen = recipe(source, tmp_path / "run", kl_weight=0.5, entropy_coeff=0.1, gumbel_temp=0.7, sample_posterior=False,
                    prior="uniform", beta0=6.0)
    chosen.model.policy = {"dense_below": 0, "full_tail": 2}  # the policy the model is converted with
    run = RouterFinetune(chosen)
    run.setup()
    modules = meta_attention_modules(run.inner)
    for m in modules:  # the new routers start at the recipe's prior: uniform
        torch.testing.assert_close(m.router.initial_bias(), m.router.fc2.bias)
        torch.testing.assert_close(m.router.prior, torch.full((3,), 2.0))
    assert run._set_step(0)["cost_lambda"] == 0.0
    expected = ObjectiveWeights(kl_weight=0.5, cost_lambda=0.0, entropy_coeff=0.1, gumbel_temp=0.7,
                                sample_posterior=False, prior="uniform", beta0=6.0)
    assert {m.objective_weights for m in modules} == {expected}
    assert {m.policy for m in modules} == {RoutingPolicy(dense_below=0, full_tail=2)}
    run.accelerator.end_training()
    with pytest.raises(ValueError, match=r"\['beta0'\] are objective settings now.*training section"):
        Recipe.from_dict({"model": {"source": str(source), "meta_attention": {"beta0": 6.0}}})


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_weights(source, tmp_path, lora):
    """training.gradient_checkpointing recomputes each layer in the backward pass: the same losses and
    weights as keeping the activations, through attention transfer, soft (sampled) and hard routing."""
    from ma_convert.core.meta_attention import MetaAttention

    calls, forward = [0], MetaAttention.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    MetaAttention.forward = counted
    try:
        plain = finetune(recipe(source, tmp_path / "plain", lora=lora))
        kept, calls[0] = calls[0], 0
        recomputed = finetune(recipe(source, tmp_path / "recomputed", lora=lora, gradient_checkpointing=True))
    finally:
        MetaAttention.forward = forward
    assert calls[0] > kept  # the layers did run again in the backward passes
    assert [h["loss"] for h in recomputed["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-5)
    a, b = meta_weights(tmp_path / "plain"), meta_weights(tmp_path / "recomputed")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
