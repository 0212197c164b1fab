"""Losses and schedules of router finetuning.

Task loss: distillation against the same model forced to full attention (the original, with no
second copy in memory) or plain next-token loss. Plus the ELBO's KL to the compute-aware prior and
the cost term, which every Meta-Attention module computes in its forward, and an optional
attention-transfer warm-up for the cheap experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.control import force_expert, meta_attention_modules, set_objective_weights
from ..core.experts import HeadAttentionExpert
from ..core.objective import ObjectiveWeights


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the next-token distributions."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


@torch.no_grad()
def teacher_logits(model, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
    """The original model's logits: the same weights with every token routed to full attention.
    `logits_to_keep` (transformers' argument; 0: all) spares the vocabulary projection when only the
    pass's attention heads are wanted."""
    with force_expert(model, "full"):
        return model(input_ids=ids, logits_to_keep=logits_to_keep).logits


def transfer_loss(model) -> torch.Tensor:
    """Per layer, MSE of each cheap expert's output to the full expert's (detached) output."""
    losses = []
    for module in meta_attention_modules(model):
        outputs = module.last_expert_outputs
        full = outputs.get(module.full_index)
        if full is None:
            continue
        target = full.detach().float()
        losses += [F.mse_loss(out.float(), target) for i, out in outputs.items() if i != module.full_index]
    if not losses:
        raise RuntimeError("no expert outputs were captured: enable capture_expert_outputs and train in soft mode")
    return torch.stack(losses).mean()


def set_transfer_capture(model, on: bool, *, heads: bool = False) -> None:
    """Capture every expert's dense output of the next forward (and, with `heads`, its Q/K/V)."""
    for module in meta_attention_modules(model):
        module.capture_expert_outputs = on
        module.capture_heads = on and heads
        module.last_expert_outputs, module.last_heads = {}, None


def layerwise_transfer_loss(model) -> torch.Tensor:
    """Attention transfer, one layer at a time: each trainable cheap expert re-attends the heads a
    forced-full (teacher) pass captured, and is scored by its MSE to the full expert's output there,
    relative to that output's mean square (so every layer weighs the same).

    Inputs are detached, so nothing but the experts' own parameters (the Hedgehog feature maps)
    gets a gradient, and no student forward or backward through the model is needed.
    """
    losses = []
    for module in meta_attention_modules(model):
        heads, target = module.last_heads, module.last_expert_outputs.get(module.full_index)
        if heads is None or target is None:
            continue
        target = target.detach().float()
        scale = target.pow(2).mean().clamp_min(1e-12)
        for i, expert in enumerate(module.experts):
            trainable = any(p.requires_grad for p in expert.parameters())
            if i == module.full_index or not trainable or not isinstance(expert, HeadAttentionExpert):
                continue
            out = expert.attend(heads["q"], heads["k"], heads["v"], None, scale=heads["scale"], causal=heads["causal"],
                                key_mask=heads["key_mask"], attn_bias=heads["attn_bias"])
            losses.append(F.mse_loss(out.float(), target) / scale)
    if not losses:
        raise RuntimeError(
            "attention transfer found no cheap expert with trainable parameters (the linear expert has them with "
            "feature_map='hedgehog'), or no forced-full pass was captured"
        )
    return torch.stack(losses).mean()


def set_step_weights(model, weights: ObjectiveWeights, *, temperature: float, cost_unit: str = "projected") -> None:
    """Apply a step's objective weights, the cost unit and the router temperature to every Meta-Attention module."""
    set_objective_weights(model, weights)
    for module in meta_attention_modules(model):
        module.cost_unit = cost_unit
        module.router.temperature = temperature
