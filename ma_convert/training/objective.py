"""Losses and schedules of router finetuning.

Task loss: distillation against the same model forced to full attention (the original, with no
second copy in memory) or plain next-token loss. Plus the ELBO's KL to the compute-aware prior and
the cost term, which every Meta-Attention module computes in its forward, and an optional
attention-transfer warm-up for the cheap experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.control import collect_aux_losses, force_expert, meta_attention_modules
from ..core.objective import cosine_ramp, linear_ramp


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
def teacher_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The original model's logits: the same weights with every token routed to full attention."""
    with force_expert(model, "full"):
        return model(input_ids=ids).logits


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


def set_transfer_capture(model, on: bool) -> None:
    for module in meta_attention_modules(model):
        module.capture_expert_outputs = on
        module.last_expert_outputs = {}


def aux_loss(model) -> torch.Tensor:
    """Sum over layers of each module's ELBO terms (KL to the prior, cost, entropy) from the last forward."""
    return collect_aux_losses(model)


def ramp(kind: str, step: int, total: int, start: float, end: float) -> float:
    return (cosine_ramp if kind == "cosine" else linear_ramp)(step, total, start, end)


def set_objective_weights(model, *, kl_weight: float, cost_lambda: float, temperature: float) -> None:
    """Apply the scheduled weights and router temperature to every Meta-Attention module."""
    for module in meta_attention_modules(model):
        module.kl_weight = kl_weight
        module.cost_lambda = cost_lambda
        module.router.temperature = temperature
