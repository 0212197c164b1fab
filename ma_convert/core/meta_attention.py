"""`MetaAttention`: router + experts + dispatch, on projected heads.

This is the part every Meta-Attention module shares: the standalone layer, the generic
`nn.MultiheadAttention` patch and converted Hugging Face models all project Q/K/V themselves and
hand the heads here. It routes each query token, runs the experts, mixes or scatters their outputs,
and records the auxiliary loss and `RoutingStats` of the last forward.

Routing modes (``routing_mode``, settable at any time):

- ``soft``: every expert runs on every token; outputs are mixed with the routing weights
  (a Dirichlet sample in training, the posterior mean at inference).
- ``hard``: each token goes to its top-``hard_top_k`` experts. Training uses straight-through
  Gumbel top-k (all experts still run, for the gradient); inference runs each expert only on its
  own tokens.
- ``auto``: ``hard``, but tokens whose uncertainty exceeds ``uncertainty_threshold`` go to the
  full expert (``uncertain_route="full"``) or stay soft (``"soft"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.backends import check_backend, resolve_backend
from .config import ROUTING_MODES, UNCERTAIN_ROUTES, MetaAttnConfig
from .controller import RouterOutput, build_router
from .dispatch import gather_bias_rows, gather_queries, group_tokens, scatter_weighted
from .experts import AttentionExpert, HeadAttentionExpert, build_expert  # the package: registers the built-ins
from .objective import dirichlet_kl, expected_cost, routing_entropy
from .stats import RoutingStats

DEFAULT_EXPERTS = ("full", "linear", "local")


@dataclass
class RecurrentInputs:
    """What recurrent experts read when a cache holds the past: this step's keys and values
    (B, Hkv, T, d), their padding mask (B, T), and the state summarising all earlier keys."""

    key: torch.Tensor
    value: torch.Tensor
    key_mask: Optional[torch.Tensor]
    state: Optional[tuple[torch.Tensor, torch.Tensor]]
    # Set by a fast path that already computed the state after this step (else the caller does).
    next_state: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def gumbel_top_k(logits: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel top-k: hard top-k weights forward, soft Gumbel-softmax gradient.

    Returns the weights and the bool mask of the k experts each token uses.
    """
    gumbel = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbel) / tau).softmax(-1)
    mask = torch.zeros_like(soft, dtype=torch.bool).scatter_(-1, soft.topk(k, dim=-1).indices, True)
    hard = torch.where(mask, soft, 0.0)
    hard = hard / hard.sum(-1, keepdim=True) if k > 1 else mask.float()
    return hard.detach() - soft.detach() + soft, mask


class MetaAttention(nn.Module):
    """Routes each query token among attention experts that share one set of projected heads."""

    def __init__(self, cfg: MetaAttnConfig, experts: Optional[Sequence[AttentionExpert]] = None) -> None:
        super().__init__()
        if experts is None:
            experts = [build_expert(name, cfg) for name in DEFAULT_EXPERTS]
        if len(experts) != cfg.n_experts:
            raise ValueError(
                f"MetaAttnConfig.expert_costs has {cfg.n_experts} entries but {len(experts)} experts were "
                f"given; give one cost per expert"
            )
        check_backend(cfg.backend)  # a requested kernel library that is missing fails here, early
        self.cfg = cfg
        self.experts = nn.ModuleList(experts)
        self.router = build_router(cfg, len(experts))
        self.register_buffer("costs", torch.tensor(cfg.expert_costs, dtype=torch.float32), persistent=False)
        names = [getattr(e, "name", "custom") for e in experts]
        # Where uncertain tokens go under uncertain_route="full": the full expert, else the costliest.
        self.full_index = names.index("full") if "full" in names else int(torch.tensor(cfg.expert_costs).argmax())
        self.routing_mode = cfg.routing_mode
        self.hard_top_k = cfg.hard_top_k
        self.gumbel_temp = cfg.gumbel_temp
        self.uncertainty_threshold = cfg.uncertainty_threshold
        self.uncertain_route = cfg.uncertain_route
        self.full_tail = cfg.full_tail
        # An expert index for every token, or a (B|1, T) LongTensor of per-token indices.
        self.forced_expert: Optional[int | torch.Tensor] = None
        # Objective weights live on the module so training schedules can move them.
        self.kl_weight, self.cost_lambda, self.entropy_coeff = cfg.kl_weight, cfg.cost_lambda, cfg.entropy_coeff
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_stats: Optional[RoutingStats] = None
        self.last_routes: Optional[torch.Tensor] = None  # (B, T) expert of each token, last forward
        # Attention-transfer training reads every expert's dense output of the last forward.
        self.capture_expert_outputs = False
        self.last_expert_outputs: dict[int, torch.Tensor] = {}
        # Layer-wise attention transfer re-runs the cheap experts on the heads the teacher pass saw.
        self.capture_heads = False
        self.last_heads: Optional[dict] = None

    # ------------------------------------------------------------------ configuration
    @property
    def expert_names(self) -> list[str]:
        return [getattr(e, "name", "custom") for e in self.experts]

    def expert_index(self, expert: int | str) -> int:
        names = self.expert_names
        if isinstance(expert, int) and 0 <= expert < len(names):
            return expert
        if isinstance(expert, str) and expert in names:
            return names.index(expert)
        raise ValueError(f"unknown expert {expert!r}; this layer's experts are {names} (or their indices)")

    def set_routing_mode(
        self,
        mode: str,
        *,
        uncertainty_threshold: Optional[float] = None,
        uncertain_route: Optional[str] = None,
        full_tail: Optional[int] = None,
    ) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing mode {mode!r} is invalid: must be one of {ROUTING_MODES}")
        if uncertainty_threshold is not None:
            if not 0.0 < uncertainty_threshold <= 1.0:
                raise ValueError(f"uncertainty_threshold={uncertainty_threshold!r} is invalid: must be in (0, 1]")
            self.uncertainty_threshold = float(uncertainty_threshold)
        if uncertain_route is not None:
            if uncertain_route not in UNCERTAIN_ROUTES:
                raise ValueError(f"uncertain_route={uncertain_route!r} is invalid: must be one of {UNCERTAIN_ROUTES}")
            self.uncertain_route = uncertain_route
        if full_tail is not None and not (isinstance(full_tail, int) and not isinstance(full_tail, bool) and full_tail >= 0):
            raise ValueError(f"full_tail={full_tail!r} is invalid: must be an integer >= 0")
        if mode == "auto" and self.uncertainty_threshold is None:
            raise ValueError("routing mode 'auto' needs an uncertainty_threshold in (0, 1]")
        if full_tail is not None:
            self.full_tail = full_tail
        self.routing_mode = mode

    # ------------------------------------------------------------------ routing
    def route(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[RouterOutput]]:
        """Routing weights (B, T, K) and the experts that run per token, chosen (B, T, K) bool."""
        b, t, _ = x.shape
        k = len(self.experts)
        if self.forced_expert is not None:
            forced = torch.as_tensor(self.forced_expert, device=x.device)
            if forced.dim() and forced.shape[-1] != t:
                raise ValueError(f"forced routes cover {forced.shape[-1]} tokens but the input has {t}")
            onehot = F.one_hot(forced.expand(b, t), k).float()
            return onehot, onehot.bool(), None
        r = self.router(x, positions, sample=self.training and self.routing_mode == "soft")
        top = r.mean.topk(self.hard_top_k, dim=-1).indices
        chosen = torch.zeros_like(r.mean, dtype=torch.bool).scatter_(-1, top, True)
        if self.routing_mode == "soft":
            weights = r.sample if self.training else r.mean
            # A soft token is reported as where a hard route would send it (projected cost).
            return weights, r.mean.argmax(-1, keepdim=True) == torch.arange(k, device=x.device), r
        if self.training:
            weights, chosen = gumbel_top_k(r.logits, self.hard_top_k, self.gumbel_temp)
            return weights, chosen, r
        weights = torch.where(chosen, r.mean, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.routing_mode == "auto":
            uncertain = (r.uncertainty > self.uncertainty_threshold).unsqueeze(-1)
            if self.uncertain_route == "full":
                full = torch.arange(k, device=x.device) == self.full_index
                weights = torch.where(uncertain, full.float(), weights)
                chosen = torch.where(uncertain, full, chosen)
            else:
                weights = torch.where(uncertain, r.mean, weights)
                chosen = chosen | uncertain
        if self.full_tail:
            tail = (torch.arange(t, device=x.device) >= t - self.full_tail)[:, None]
            full = torch.arange(k, device=x.device) == self.full_index
            weights = torch.where(tail, full.to(weights.dtype), weights)
            chosen = torch.where(tail, full, chosen)
        return weights, chosen, r

    def aux_loss(self, r: Optional[RouterOutput], valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-token ELBO terms averaged over valid tokens: KL to the prior (Bayesian router),
        plus ``cost_lambda`` x expected cost, minus ``entropy_coeff`` x entropy."""
        if r is None:
            return self.costs.new_zeros(())
        per_token = torch.zeros_like(r.mean[..., 0])
        if r.concentration is not None and self.kl_weight:
            per_token = per_token + self.kl_weight * dirichlet_kl(r.concentration, self.router.prior)
        if self.cost_lambda:
            per_token = per_token + self.cost_lambda * expected_cost(r.mean, self.costs)
        if self.entropy_coeff:
            per_token = per_token - self.entropy_coeff * routing_entropy(r.mean)
        if valid is None:
            return per_token.mean()
        w = valid.to(per_token.dtype)
        return (per_token * w).sum() / w.sum().clamp_min(1.0)

    # ------------------------------------------------------------------ experts
    def run_experts(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        weights: torch.Tensor,
        *,
        scale: Optional[float] = None,
        causal: bool = True,
        key_mask: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
        recurrent: Optional[RecurrentInputs] = None,
    ) -> torch.Tensor:
        """Weighted sum of the head-level experts' outputs, (B, Hq, T, d) for queries (B, Hq, T, d).

        With `recurrent`, recurrent experts read the keys of this step plus a state summarising
        the earlier ones (a cache) instead of all of `k`/`v`.

        Queries are the last T keys. In training every expert runs densely (the straight-through
        gradient needs every output); at inference an expert runs on all tokens only when all of
        them route to it, on none when none do, and otherwise on its gathered tokens alone.
        """
        fast = self._fast_path(q, k, v, weights, scale, causal, key_mask, attn_bias, recurrent)
        if fast is not None:
            return fast
        forced = self.forced_expert
        if isinstance(forced, int) and isinstance(self.experts[forced], HeadAttentionExpert):
            # One expert for every token: its output is the result (no weights, no host syncs).
            expert = self.experts[forced]
            keys, values, call = self._expert_inputs(expert, k, v, scale, causal, key_mask, recurrent)
            part = expert.attend(q, keys, values, None, attn_bias=attn_bias, **call)
            if self.capture_expert_outputs:
                self.last_expert_outputs[forced] = part
            return part
        b, _, t, _ = q.shape
        out = None
        # Dense runs are for gradients through soft or straight-through weights; forced routes
        # have none, so they skip the experts no token goes to (the teacher pass of distillation).
        sparse = not self.training or self.forced_expert is not None
        for i, expert in enumerate(self.experts):
            if not isinstance(expert, HeadAttentionExpert):
                continue
            w = weights[..., i]
            selected = w != 0 if sparse else None
            if selected is not None and not bool(selected.any()):
                continue
            keys, values, call = self._expert_inputs(expert, k, v, scale, causal, key_mask, recurrent)
            if selected is None or bool(selected.all()):
                part = expert.attend(q, keys, values, None, attn_bias=attn_bias, **call)
                if self.capture_expert_outputs:
                    self.last_expert_outputs[i] = part
                contrib = part * w[:, None, :, None].to(part.dtype)
                out = contrib if out is None else out + contrib
                continue
            tokens = group_tokens(selected)
            offset = keys.shape[2] - t  # token index -> key index (keys may start with a cache)
            part = expert.attend(
                gather_queries(q, tokens),
                keys,
                values,
                torch.where(tokens >= 0, tokens + offset, -1),
                attn_bias=gather_bias_rows(attn_bias, tokens),
                **call,
            )
            if out is None:
                out = torch.zeros_like(q)
            scatter_weighted(out, part, tokens, w)
        return out if out is not None else torch.zeros_like(q)

    @staticmethod
    def _expert_inputs(expert, k, v, scale, causal, key_mask, recurrent):
        """Keys, values and keyword arguments an expert attends with: a recurrent expert reads
        this step's keys plus its state when a cache holds the past."""
        call = dict(scale=scale, causal=causal, key_mask=key_mask)
        if recurrent is not None and expert.recurrent:
            call.update(key_mask=recurrent.key_mask, state=recurrent.state)
            return recurrent.key, recurrent.value, call
        return k, v, call

    def _one_expert_per_token(self) -> bool:
        """Inference with hard top-1 routes: every token's weight is 1 on exactly one expert."""
        if self.training:
            return False
        if self.forced_expert is not None:
            return True
        uncertain_ok = self.routing_mode == "hard" or (self.routing_mode == "auto" and self.uncertain_route == "full")
        return self.hard_top_k == 1 and uncertain_ok

    def _fast_path(self, q, k, v, weights, scale, causal, key_mask, attn_bias, recurrent) -> Optional[torch.Tensor]:
        """The GPU kernels of `ma_convert.kernels` when the backend and the call allow (else None)."""
        if not q.is_cuda or not self._one_expert_per_token():
            return None
        backend = resolve_backend(self.cfg.backend, q.device)
        if backend in ("torch", "sdpa"):
            return None
        if isinstance(self.forced_expert, int) and self.forced_expert == self.full_index and q.shape[2] > 1:
            return None  # a prompt all full: the plain SDPA call of the reference path is the original
        try:  # absolute: a remote-code copy of this file runs without the package, on the torch path
            from ma_convert.kernels import routed
        except ImportError:
            return None
        if routed.unsupported_reason(self, q, causal=causal, key_mask=key_mask, attn_bias=attn_bias) is not None:
            return None
        return routed.routed_heads(self, q, k, v, weights, scale=scale, backend=backend, recurrent=recurrent)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        causal: bool = True,
        key_mask: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
        query_valid: Optional[torch.Tensor] = None,
        recurrent: Optional[RecurrentInputs] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route the tokens of `x` (B, T, D) and attend with heads q (B, Hq, T, d), k/v (B, Hkv, Tk, d).

        `positions` (B, T) or (T,) feed the router's position feature (default: the last T key
        indices, which is right without padding; pass position ids otherwise).
        `query_valid` (B, T) marks real tokens, for the loss and the statistics.
        Returns the mixed head outputs (B, Hq, T, d) and the routing weights (B, T, K).
        """
        if positions is None:  # the queries are the last T keys
            positions = torch.arange(k.shape[2] - x.shape[1], k.shape[2], device=x.device)
        weights, chosen, r = self.route(x, positions)
        self.last_aux_loss = self.aux_loss(r, query_valid)
        mean = weights if r is None else r.mean
        uncertainty = torch.zeros_like(mean[..., 0]) if r is None else r.uncertainty
        self.last_stats = RoutingStats.from_routing(mean, chosen, uncertainty, self.costs, query_valid)
        # The expert each token is routed to (the highest-weight one it runs on; soft: argmax of the mean).
        self.last_routes = torch.where(chosen, weights.detach(), -1.0).argmax(-1)
        # Kept only while capturing: the heads of a generation step would pin its KV cache.
        self.last_heads = dict(q=q.detach(), k=k.detach(), v=v.detach(), scale=scale, causal=causal,
                               key_mask=key_mask, attn_bias=attn_bias) if self.capture_heads else None
        heads = self.run_experts(
            q, k, v, weights, scale=scale, causal=causal, key_mask=key_mask, attn_bias=attn_bias, recurrent=recurrent
        )
        return heads, weights

    def extra_repr(self) -> str:
        return f"experts={self.expert_names}, costs={self.cfg.expert_costs}, mode={self.routing_mode}"
