"""Per-token routers: the Bayesian Dirichlet router and the prior-free softmax router.

Both see only the token itself, ``[x_t, ||x_t||/sqrt(D), pos(t)]``, so a token's route never
depends on later tokens or on the sequence length: prefill and decode route a token the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.spec import RouterWeights
from .config import CONCENTRATION_FLOOR, MetaAttnConfig
from .initial import InitialValues
from .objective import ObjectiveWeights, prior_concentration, routing_entropy


def position_feature(positions: torch.Tensor, max_positions: int) -> torch.Tensor:
    """log1p(t) / log1p(max_positions): causal and independent of the sequence length."""
    return torch.log1p(positions.float().clamp_min(0)) / math.log1p(max_positions)


@dataclass
class RouterOutput:
    """What a router says about each token (all (B, T, K) or (B, T), float32)."""

    mean: torch.Tensor  # posterior mean (Bayesian) or softmax probabilities
    sample: torch.Tensor  # training weights: a reparameterised Dirichlet sample, else `mean`
    logits: torch.Tensor  # for Gumbel top-k: log of the mean (Bayesian) or tempered logits
    uncertainty: torch.Tensor  # in (0, 1); higher is less certain
    concentration: Optional[torch.Tensor] = None  # Dirichlet gamma(x); None for the softmax router


class _RouterMLP(InitialValues, nn.Module):
    def __init__(self, cfg: MetaAttnConfig, n_experts: int) -> None:
        super().__init__()
        self.max_positions = cfg.max_positions
        self.temperature = cfg.temperature
        in_dim = cfg.d_model + 2
        # The LayerNorm keeps routing stable across models whose hidden states differ in scale by 100x.
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, cfg.controller_hidden)
        self.fc2 = nn.Linear(cfg.controller_hidden, n_experts)

    def raw(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x.float()
        rms = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
        pos = position_feature(positions, self.max_positions).to(x.device).expand(x.shape[:-1]).unsqueeze(-1)
        # The MLP runs in its parameters' dtype; routing probabilities are always float32.
        h = F.gelu(self.fc1(self.norm(torch.cat([x, rms, pos], dim=-1).to(self.fc1.weight.dtype))))
        return self.fc2(h).float() / self.temperature

    def kernel_weights(self) -> RouterWeights:
        """This router as the fused routing kernel reads it (its parameters, not copies)."""
        return RouterWeights(
            self.norm.weight, self.norm.bias, self.norm.eps, self.fc1.weight, self.fc1.bias, self.fc2.weight,
            self.fc2.bias, self.max_positions, getattr(self, "eps", 0.0),
        )

    def output_values(self, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        """Small output weights and a bias that sets the initial routing distribution."""
        return {"fc2.weight": torch.empty_like(self.fc2.weight).normal_(0.0, 0.02), "fc2.bias": bias}

    def forward(self, x: torch.Tensor, positions: torch.Tensor, sample: bool = False) -> RouterOutput:
        """`sample`: the Bayesian router draws the training weights from its posterior (the module asks, per
        its `sample_posterior`)."""
        return self.from_raw(self.raw(x, positions), sample)


class DirichletRouter(_RouterMLP):
    """Bayesian router: gamma(x) = softplus(MLP(x)) + eps parameterises Dir(gamma(x)) per token.

    Training uses reparameterised samples (``Dirichlet.rsample``) or the mean; inference uses the
    posterior mean, and the total concentration gives the uncertainty ``K / (K + sum gamma)``.
    The prior Dir(beta0 * pi) is the training objective's (`ObjectiveWeights.prior`, `.beta0`): a new
    router starts at the default one, `set_prior` changes it.
    """

    def __init__(self, cfg: MetaAttnConfig, n_experts: int) -> None:
        super().__init__(cfg, n_experts)
        self.eps = CONCENTRATION_FLOOR
        self.costs = list(cfg.expert_costs)
        defaults = ObjectiveWeights()
        self.prior_kind, self.beta0 = defaults.prior, defaults.beta0
        self.register_buffer("prior", self.prior_target(), persistent=False)
        self.reset_parameters()

    def prior_target(self) -> torch.Tensor:
        return prior_concentration(self.costs, self.prior_kind, self.beta0)

    def set_prior(self, kind: str, beta0: float, start_at_it: bool = False) -> None:
        """The KL's prior Dir(beta0 * pi(kind)); `start_at_it` also moves the routing there (a new
        router: the output bias that makes the KL ~0)."""
        if (kind, beta0) != (self.prior_kind, self.beta0):
            self.prior_kind, self.beta0 = kind, beta0
            self.prior = self.prior_target().to(self.fc2.bias.device)
        if start_at_it:
            with torch.no_grad():
                self.fc2.bias.copy_(self.initial_bias())

    def initial_bias(self) -> torch.Tensor:
        """The output bias that starts routing at the prior: softplus(bias) + eps = beta0 * pi,
        so the KL is ~0 at initialisation."""
        target = (self.prior_target() - self.eps).clamp_min(1e-4)
        return target + torch.log(-torch.expm1(-target))  # softplus^-1

    def initial_values(self) -> dict[str, torch.Tensor]:
        return {"prior": self.prior_target(), **self.output_values(self.initial_bias())}

    def from_raw(self, raw: torch.Tensor, sample: bool = False) -> RouterOutput:
        """The posterior from the MLP's output. Its mean ranks the experts as `raw` does (softplus is
        increasing), so hard routing can take `raw.argmax` without it."""
        gamma = F.softplus(raw) + self.eps
        total = gamma.sum(-1, keepdim=True)
        mean = weights = gamma / total
        if sample:
            # No argument validation: non-finite concentrations (a diverged router) give a NaN loss, which
            # training reports with its last good checkpoint, instead of a ValueError holding the whole tensor.
            weights = torch.distributions.Dirichlet(gamma, validate_args=False).rsample().clamp_min(1e-12)
        k = gamma.shape[-1]
        return RouterOutput(mean=mean, sample=weights, logits=mean.clamp_min(1e-12).log(),
                            uncertainty=(k / (k + total)).squeeze(-1), concentration=gamma)


class SoftmaxRouter(_RouterMLP):
    """Prior-free router (the ablation): softmax(MLP(x) / temperature); no KL term."""

    def __init__(self, cfg: MetaAttnConfig, n_experts: int) -> None:
        super().__init__(cfg, n_experts)
        self.reset_parameters()

    def initial_values(self) -> dict[str, torch.Tensor]:
        return self.output_values(torch.zeros_like(self.fc2.bias))

    def from_raw(self, logits: torch.Tensor, sample: bool = False) -> RouterOutput:
        probs = logits.softmax(-1)
        return RouterOutput(mean=probs, sample=probs, logits=logits, uncertainty=routing_entropy(probs))


def build_router(cfg: MetaAttnConfig, n_experts: int) -> nn.Module:
    return DirichletRouter(cfg, n_experts) if cfg.router == "bayesian" else SoftmaxRouter(cfg, n_experts)
