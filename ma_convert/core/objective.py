"""The router's objective: Dirichlet KL to a compute-aware prior, expected cost, entropy, schedules.

ELBO per token (the paper): task loss + KL(Dir(gamma(x)) || Dir(beta0 * pi)). The prior mean pi
puts more mass on cheaper experts, so the KL pulls routing towards cheap attention unless the
task loss pays for exact attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .config import check_fields, checker, is_num

PRIORS = ("compute", "uniform")


@dataclass(frozen=True)
class ObjectiveWeights:
    """How a Meta-Attention module's training objective weighs its terms (not saved with a model:
    the training recipe sets them, `set_objective_weights` applies them)."""

    kl_weight: float = 1.0  # the ELBO's KL to the prior Dir(beta0 * pi)
    prior: str = "compute"  # pi: proportional to 1 / cost ("compute") or "uniform"
    beta0: float = 3.0  # the prior's total concentration; 3 with a uniform prior is the flat Dir(1,1,1)
    cost_lambda: float = 0.0  # x expected cost per token
    entropy_coeff: float = 0.0  # - x routing entropy per token
    gumbel_temp: float = 1.0  # straight-through Gumbel top-k under hard routing in training
    sample_posterior: bool = True  # soft training: reparameterised Dirichlet samples instead of the mean

    def __post_init__(self) -> None:
        need = checker(self)
        need(is_num(self.kl_weight) and self.kl_weight >= 0, "kl_weight", "a number >= 0")
        need(self.prior in PRIORS, "prior", f"one of {PRIORS}")
        need(is_num(self.beta0) and self.beta0 > 0, "beta0", "a number > 0")
        need(is_num(self.cost_lambda) and self.cost_lambda >= 0, "cost_lambda", "a number >= 0")
        need(is_num(self.entropy_coeff), "entropy_coeff", "a finite number")
        need(is_num(self.gumbel_temp) and self.gumbel_temp > 0, "gumbel_temp", "a number > 0")
        need(isinstance(self.sample_posterior, bool), "sample_posterior", "True or False")

    def replace(self, **changes) -> "ObjectiveWeights":
        """A validated copy with some weights changed (unknown names are errors)."""
        check_fields(ObjectiveWeights, changes)
        return replace(self, **changes)


def prior_mean(costs: Sequence[float] | torch.Tensor, kind: str = "compute") -> torch.Tensor:
    """The prior's mean pi over experts: proportional to 1/cost ("compute") or uniform."""
    costs = torch.as_tensor(costs, dtype=torch.float32)
    if kind == "uniform":
        return torch.full_like(costs, 1.0 / costs.numel())
    if kind == "compute":
        inv = 1.0 / costs
        return inv / inv.sum()
    raise ValueError(f"prior={kind!r} is invalid: must be 'compute' or 'uniform'")


def prior_concentration(costs: Sequence[float] | torch.Tensor, kind: str, beta0: float) -> torch.Tensor:
    """Concentrations of the prior Dir(beta0 * pi)."""
    return beta0 * prior_mean(costs, kind)


def dirichlet_kl(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(Dir(alpha) || Dir(beta)) over the last dimension (broadcasts)."""
    alpha0 = alpha.sum(-1)
    beta0 = beta.sum(-1)
    return (
        torch.lgamma(alpha0)
        - torch.lgamma(alpha).sum(-1)
        - torch.lgamma(beta0)
        + torch.lgamma(beta).sum(-1)
        + ((alpha - beta) * (torch.digamma(alpha) - torch.digamma(alpha0).unsqueeze(-1))).sum(-1)
    )


def expected_cost(weights: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Per-token expected attention cost sum_i w_i c_i."""
    return (weights * costs.to(weights.dtype)).sum(-1)


def routing_entropy(weights: torch.Tensor, normalised: bool = True) -> torch.Tensor:
    """Per-token entropy of the routing distribution; divided by log K when normalised."""
    ent = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    k = weights.shape[-1]
    return ent / math.log(k) if normalised and k > 1 else ent


def linear_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear interpolation from `start` to `end` over `total_steps`, then constant."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * frac


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine interpolation from `start` to `end` over `total_steps`, then constant."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
