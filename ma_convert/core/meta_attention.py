"""`MetaAttention`: router + experts + dispatch, on projected heads.

This is the part every Meta-Attention module shares: the standalone layer, the generic
`nn.MultiheadAttention` patch and converted Hugging Face models all project Q/K/V themselves and
hand the heads here. It routes each query token, runs the experts, mixes or scatters their outputs,
and records the auxiliary loss and `RoutingStats` of the last forward.

Routing modes (the `RoutingPolicy`'s ``mode``, settable at any time with `set_routing_mode` or
`set_policy`; the module keeps the policy as plain attributes, read on every call):

- ``soft``: every expert runs on every token; outputs are mixed with the routing weights
  (a Dirichlet sample in training, the posterior mean at inference).
- ``hard``: each token goes to its top expert. Training uses straight-through Gumbel top-1 (all
  experts still run, for the gradient); inference runs each expert only on its own tokens.
- ``auto``: ``hard``, but tokens whose uncertainty exceeds ``uncertainty_threshold`` go to the
  full expert (``uncertain_route="full"``) or stay soft (``"soft"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.backends import check_backend, resolve_backend
from ..kernels.gather import gather_queries, group_tokens
from ..kernels.spec import DENSE_BELOW, RoutedSpec
from .config import MetaAttnConfig
from .controller import DirichletRouter, RouterOutput, build_router
from .cost import token_costs
from .experts import AttentionExpert, HeadAttentionExpert, build_expert  # the package: registers the built-ins
from .experts.full import FullAttention
from .experts.hybrid import HybridAttention
from .experts.linear import LinearAttention, feature_weight
from .experts.local import LocalAttention
from .initial import InitialValues
from .objective import ObjectiveWeights, dirichlet_kl, expected_cost, routing_entropy
from .policy import RoutingPolicy
from .stats import RoutingStats


def gumbel_top_1(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel top-1: one-hot weights forward, soft Gumbel-softmax gradient.

    Returns the weights and the bool mask of the expert each token uses.
    """
    gumbel = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbel) / tau).softmax(-1)
    mask = soft == soft.amax(-1, keepdim=True)
    return mask.float() - soft.detach() + soft, mask


# Hard dispatch at inference: an expert's tokens are packed per row to the longest row's count; padding
# slots hold position -1, which experts skip when sizing their work and which adds nothing on the way back.
def gather_bias_rows(attn_bias: Optional[torch.Tensor], tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows of an additive bias (B|1, H|1, T|1, Tk) for the gathered queries."""
    if attn_bias is None or attn_bias.shape[-2] == 1:
        return attn_bias
    bias = attn_bias.expand(tokens.shape[0], *attn_bias.shape[1:])
    idx = tokens.clamp_min(0)[:, None, :, None].expand(bias.shape[0], bias.shape[1], tokens.shape[1], bias.shape[-1])
    return bias.gather(2, idx)


def scatter_weighted(out: torch.Tensor, part: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> None:
    """out[:, :, tokens] += w * part, in place, with w the tokens' routing weights (B, T)."""
    b, h, n, d = part.shape
    valid = tokens >= 0
    index = tokens.clamp_min(0)
    w = torch.where(valid, weights.gather(1, index), 0.0)
    out.scatter_add_(2, index[:, None, :, None].expand(b, h, n, d), part * w[:, None, :, None].to(part.dtype))


MAX_FUSED_HIDDEN = 256  # the routing kernel's limit on controller_hidden; wider routers run in torch


@dataclass
class CacheInputs:
    """What the kernel expert reads when a cache holds the past: `store`, where its running state lives
    between calls (in converted models, on the KV cache): ``store.get()`` returns (S, z, seen), the state
    over keys start .. seen-1, or None, and ``store.set(S, z, seen)`` replaces it; `offset`, the
    position of the first cached key the call sees (0 unless the cache drops old keys); and `eager`,
    True where it does (a sliding window), so that the state cannot be caught up later from the
    cache and takes in every key as it comes."""

    store: Any
    offset: int = 0
    eager: bool = False


class _Decision:
    """What the last forward decided, kept as the tensors that produced it: statistics, the auxiliary
    loss and the per-token routes are computed only when read."""

    def __init__(self, module, shape, query_valid, weights=None, chosen=None, r=None, only=None, raw=None, routes=None):
        self.module, self.shape, self.query_valid = module, shape, query_valid
        self.weights, self.chosen, self.r, self.only = weights, chosen, r, only
        self.raw, self._routes = raw, routes  # the lean hard path: the router's output and the routes it took
        self._stats = None

    def _expand(self) -> None:
        """The lean hard path keeps only the router's raw output and the routes, and an all-full call
        only its expert: the posterior and the chosen experts, when asked for."""
        if self.chosen is None:
            self.r = None if self.raw is None else self.module.router.from_raw(self.raw)
            self.chosen = F.one_hot(self.routes(), len(self.module.experts)).bool()
            self.weights = self.chosen.float()

    def stats(self) -> RoutingStats:
        if self._stats is None:
            self._expand()
            mean = self.weights if self.r is None else self.r.mean
            uncertainty = torch.zeros_like(mean[..., 0]) if self.r is None else self.r.uncertainty
            self._stats = RoutingStats.from_routing(mean, self.chosen, uncertainty, self.module.costs, self.query_valid)
        return self._stats

    def experts_run(self) -> torch.Tensor:
        """(B, T, K) bool: the experts each token ran on (every expert with a weight, under soft routing)."""
        self._expand()
        return self.weights.detach() != 0

    def routes(self) -> torch.Tensor:
        if self.only is not None and self._routes is None:
            self._routes = torch.full(self.shape, self.only, dtype=torch.long, device=self.module.costs.device)
        if self._routes is not None:
            return self._routes.long()
        # The highest-weight expert each token runs on (soft: the argmax of the mean).
        return torch.where(self.chosen, self.weights.detach(), -1.0).argmax(-1)

    def router_output(self) -> Optional[RouterOutput]:
        self._expand()
        return self.r

    def aux_loss(self) -> torch.Tensor:
        self._expand()
        return self.module.aux_loss(self.r, self.query_valid)


class MetaAttention(InitialValues, nn.Module):
    """Routes each query token among attention experts that share one set of projected heads."""

    def __init__(
        self, cfg: MetaAttnConfig, experts: Optional[Sequence[AttentionExpert]] = None,
        policy: Optional[RoutingPolicy] = None,
    ) -> None:
        super().__init__()
        if experts is None:  # the built-ins: full, kernel attention (its hybrid when linear_window > 0), local
            kernel = "hybrid" if cfg.linear_window else "linear"
            experts = [build_expert(name, cfg) for name in ("full", kernel, "local")]
        if len(experts) != cfg.n_experts:
            raise ValueError(
                f"MetaAttnConfig.expert_costs has {cfg.n_experts} entries but {len(experts)} experts were "
                f"given; give one cost per expert"
            )
        self.cfg = cfg
        self.experts = nn.ModuleList(experts)
        self.router = build_router(cfg, len(experts))
        self.register_buffer("costs", torch.tensor(cfg.expert_costs, dtype=torch.float32), persistent=False)
        names = self.expert_names
        # Where uncertain tokens go under uncertain_route="full": the full expert, else the costliest.
        self.full_index = names.index("full") if "full" in names else int(torch.tensor(cfg.expert_costs).argmax())
        # The kernel-attention expert (linear or hybrid), which keeps a state when a cache holds the past.
        self.kernel_index = next((i for i, e in enumerate(experts) if isinstance(e, LinearAttention)), None)
        # Custom experts map hidden states and need routing weights even when every token goes to one expert.
        self._head_experts_only = all(isinstance(e, HeadAttentionExpert) for e in experts)
        # The policy as plain attributes (routing_mode, full_tail, ...): the hot path reads them.
        self.set_policy(RoutingPolicy() if policy is None else policy)
        # An expert index for every token, or a (B|1, T) LongTensor of per-token indices.
        self.forced_expert: Optional[int | torch.Tensor] = None
        # Objective weights live on the module so training schedules can move them.
        self.set_objective_weights(ObjectiveWeights())
        # What the cost term charges: the experts' fixed costs ("projected"), or the work each does at
        # the token's position over full attention's at this length ("real", `cost.token_costs`).
        self.cost_unit = "projected"
        self._token_costs_cache: tuple = (None, None)  # (length, device), token_costs there
        # What each forward leaves behind, on a plain object: nn.Module.__setattr__ is slow on a hot path.
        self._last = SimpleNamespace(decision=None, heads=None)
        self._expert_list = tuple(experts)  # indexing a ModuleList costs more than a tuple on every call
        # Attention-transfer training reads every expert's dense output of the last forward.
        self.capture_expert_outputs = False
        self.last_expert_outputs: dict[int, torch.Tensor] = {}
        # Layer-wise attention transfer re-runs the cheap experts on the heads the teacher pass saw.
        self.capture_heads = False
        self._spec: Optional[RoutedSpec] = None

    # ------------------------------------------------------------------ what the last forward did
    def _read_last(self, read):
        decision = self._last.decision
        return None if decision is None else read(decision)

    @property
    def last_stats(self) -> Optional[RoutingStats]:
        """`RoutingStats` of the last forward (computed when first read)."""
        return self._read_last(_Decision.stats)

    @property
    def last_routes(self) -> Optional[torch.Tensor]:
        """(B, T) the expert each token of the last forward was routed to."""
        return self._read_last(_Decision.routes)

    @property
    def last_experts_run(self) -> Optional[torch.Tensor]:
        """(B, T, K) bool: the experts each token of the last forward ran on (for the real attention cost)."""
        return self._read_last(_Decision.experts_run)

    @property
    def last_router_output(self) -> Optional[RouterOutput]:
        """The router's output for the last forward: posterior mean, uncertainty, ... (None: no router ran)."""
        return self._read_last(_Decision.router_output)

    @property
    def last_uncertainty(self) -> Optional[torch.Tensor]:
        """(B, T) the router's uncertainty for each token of the last forward (None: no router ran)."""
        r = self.last_router_output
        return None if r is None else r.uncertainty

    @property
    def last_aux_loss(self) -> Optional[torch.Tensor]:
        """The ELBO terms of the last forward (KL to the prior, cost, entropy), computed when read."""
        return self._read_last(_Decision.aux_loss)

    @property
    def last_heads(self) -> Optional[dict]:
        """q, k, v and the call's settings of the last forward, while `capture_heads` is on."""
        return self._last.heads

    @last_heads.setter
    def last_heads(self, heads: Optional[dict]) -> None:
        self._last.heads = heads

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

    @property
    def policy(self) -> RoutingPolicy:
        """The routing policy this module runs with now."""
        return RoutingPolicy(
            mode=self.routing_mode, uncertainty_threshold=self.uncertainty_threshold,
            uncertain_route=self.uncertain_route, full_tail=self.full_tail, backend=self.backend,
            dense_below=self.dense_below,
        )

    def set_policy(self, policy: RoutingPolicy) -> None:
        check_backend(policy.backend)  # a requested kernel library that is missing fails here, early
        self.routing_mode, self.uncertainty_threshold = policy.mode, policy.uncertainty_threshold
        self.uncertain_route, self.full_tail = policy.uncertain_route, policy.full_tail
        self.backend, self.dense_below = policy.backend, policy.dense_below

    @property
    def objective_weights(self) -> ObjectiveWeights:
        """The weights of this module's training objective now."""
        prior = dict(prior=self.router.prior_kind, beta0=self.router.beta0) if hasattr(self.router, "set_prior") else {}
        return ObjectiveWeights(
            kl_weight=self.kl_weight, cost_lambda=self.cost_lambda, entropy_coeff=self.entropy_coeff,
            gumbel_temp=self.gumbel_temp, sample_posterior=self.sample_posterior, **prior,
        )

    def set_objective_weights(self, weights: ObjectiveWeights, start_at_prior: bool = False) -> None:
        """`start_at_prior`: a new Bayesian router also starts routing at the weights' prior."""
        self.kl_weight, self.cost_lambda = weights.kl_weight, weights.cost_lambda
        self.entropy_coeff, self.gumbel_temp = weights.entropy_coeff, weights.gumbel_temp
        self.sample_posterior = weights.sample_posterior
        if hasattr(self.router, "set_prior"):  # the Bayesian router; the softmax one has no prior
            self.router.set_prior(weights.prior, weights.beta0, start_at_prior)

    def routed_spec(self) -> RoutedSpec:
        """The experts as the kernels see them (built once; parameters are shared, not copied)."""
        if self._spec is not None:
            return self._spec
        spec = RoutedSpec(n_experts=len(self.experts), router=self.router.kernel_weights())
        for i, expert in enumerate(self.experts):
            kind = type(expert)
            if kind is FullAttention and spec.full is None:
                spec.full, spec.full_window = i, expert.window
            elif kind is LocalAttention and spec.local is None:
                spec.local, spec.local_window, spec.local_sinks = i, expert.window, expert.sinks
            elif kind in (LinearAttention, HybridAttention) and spec.kernel is None:
                spec.kernel = i
                spec.q_map_weight, spec.k_map_weight = feature_weight(expert.q_map), feature_weight(expert.k_map)
                if kind is HybridAttention:
                    spec.kernel_window, spec.kernel_sinks, spec.log_weight = expert.window, expert.sinks, expert.log_weight
        if spec.n_experts != 3 or None in (spec.full, spec.kernel, spec.local):
            spec.reason = "the fast path serves the three built-in experts only"
        self._spec = spec
        return spec

    def initial_values(self) -> dict[str, torch.Tensor]:
        """The experts' costs (a buffer no checkpoint holds); routers and experts start themselves."""
        return {"costs": torch.tensor(self.cfg.expert_costs, dtype=torch.float32)}

    def _apply(self, fn, *args, **kwargs):
        self._spec = None  # its device tables and parameter references follow the module
        return super()._apply(fn, *args, **kwargs)

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
        r = self.router(x, positions, sample=self.training and self.routing_mode == "soft" and self.sample_posterior)
        if self.routing_mode == "soft":
            # A soft token is reported as where a hard route would send it (projected cost).
            return (r.sample if self.training else r.mean), F.one_hot(r.mean.argmax(-1), k).bool(), r
        if self.training:
            weights, chosen = gumbel_top_1(r.logits, self.gumbel_temp)
            return weights, chosen, r
        uncertain = r.uncertainty > self.uncertainty_threshold if self.routing_mode == "auto" else None
        stay_soft = uncertain is not None and self.uncertain_route == "soft"
        chosen = F.one_hot(self._policy_routes(r.mean.argmax(-1), None if stay_soft else uncertain), k).bool()
        weights = chosen.float()
        if stay_soft:  # uncertain tokens outside the full tail run on every expert, mixed by the mean
            uncertain[:, max(0, t - self.full_tail):] = False
            weights = torch.where(uncertain[..., None], r.mean, weights)
            chosen = chosen | uncertain[..., None]
        return weights, chosen, r

    def _lean_hard_routing(self) -> bool:
        """Inference with one expert per token decided by the router alone: routes come from the
        router's raw output (argmax), with nothing else computed until it is read."""
        return self.forced_expert is None and self._head_experts_only and self._one_expert_per_token()

    def route_hard(self, x: torch.Tensor, positions: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) the expert of each token, and the router's raw output it came from (see `_lean_hard_routing`).
        `fused`: on the fast path, the routing kernel computes both in one launch."""
        auto = self.routing_mode == "auto"
        # The kernel holds the router's hidden layer in one tile (up to MAX_FUSED_HIDDEN units).
        small = self.router.fc1.out_features <= MAX_FUSED_HIDDEN
        if fused and small and (not auto or isinstance(self.router, DirichletRouter)):
            from ma_convert.kernels.triton_routing import route_tokens

            return route_tokens(self.routed_spec().router, x, positions, temperature=self.router.temperature,
                                full_index=self.full_index,
                                full_tail=self.full_tail, uncertainty_threshold=self.uncertainty_threshold if auto else None)
        raw = self.router.raw(x, positions)
        uncertain = self.router.from_raw(raw).uncertainty > self.uncertainty_threshold if auto else None
        return self._policy_routes(raw.argmax(-1), uncertain), raw

    def _policy_routes(self, routes: torch.Tensor, uncertain: Optional[torch.Tensor]) -> torch.Tensor:
        """Hard routes (B, T) after the policy: `uncertain` tokens and the last `full_tail` go to the full expert."""
        if uncertain is not None:
            routes = torch.where(uncertain, self.full_index, routes)
        if self.full_tail:
            routes[:, max(0, routes.shape[1] - self.full_tail):] = self.full_index
        return routes

    def aux_loss(self, r: Optional[RouterOutput], valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-token ELBO terms averaged over valid tokens: KL to the prior (Bayesian router),
        plus ``cost_lambda`` x expected cost, minus ``entropy_coeff`` x entropy."""
        if r is None:
            return self.costs.new_zeros(())
        per_token = torch.zeros_like(r.mean[..., 0])
        if r.concentration is not None and self.kl_weight:
            per_token = per_token + self.kl_weight * dirichlet_kl(r.concentration, self.router.prior)
        if self.cost_lambda:
            # Real costs assume the queries are positions 0 .. T-1 (training: no cache, no padding).
            real = self.cost_unit == "real"
            costs = self._token_costs(r.mean.shape[1], r.mean.device) if real else self.costs
            per_token = per_token + self.cost_lambda * expected_cost(r.mean, costs)
        if self.entropy_coeff:
            per_token = per_token - self.entropy_coeff * routing_entropy(r.mean)
        if valid is None:
            return per_token.mean()
        w = valid.to(per_token.dtype)
        return (per_token * w).sum() / w.sum().clamp_min(1.0)

    def _token_costs(self, n: int, device) -> torch.Tensor:
        """`cost.token_costs` at this length, kept while the length stays (every training step)."""
        key = (n, str(device))
        if self._token_costs_cache[0] != key:
            self._token_costs_cache = (key, token_costs(self, n, device))
        return self._token_costs_cache[1]

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
        cache: Optional[CacheInputs] = None,
    ) -> torch.Tensor:
        """Weighted sum of the head-level experts' outputs, (B, Hq, T, d) for queries (B, Hq, T, d).

        Queries are the last T keys. With `cache`, k/v hold the cached keys too, and the kernel
        expert reads a state over the earlier keys (caught up from the cache) instead of all of them.

        In training every expert runs densely (the straight-through gradient needs every output);
        at inference an expert runs on all tokens only when all of them route to it, on none when
        none do, and otherwise on its gathered tokens alone.
        """
        b, _, t, _ = q.shape
        forced = self.forced_expert
        if isinstance(forced, int) and isinstance(self._expert_list[forced], HeadAttentionExpert):
            # One expert for every token: its output is the result (no weights, no host syncs).
            return self._run_dense(forced, q, k, v, scale, causal, key_mask, attn_bias, cache)
        fast = self._fast_path(q, k, v, weights, scale, causal, key_mask, attn_bias, cache)
        if fast is not None:
            return fast
        if not weights.is_floating_point():  # per-token routes: one expert each
            weights = F.one_hot(weights, len(self.experts)).float()
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
            if selected is None or bool(selected.all()):
                part = self._run_dense(i, q, k, v, scale, causal, key_mask, attn_bias, cache)
                contrib = part * w[:, None, :, None].to(part.dtype)
                out = contrib if out is None else out + contrib
                continue
            keys, values, call = self._expert_inputs(i, k, v, t, scale, causal, key_mask, cache)
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

    def _run_dense(self, index, q, k, v, scale, causal, key_mask, attn_bias, cache) -> torch.Tensor:
        """One expert on every query (its output kept while `capture_expert_outputs` is on)."""
        keys, values, call = self._expert_inputs(index, k, v, q.shape[2], scale, causal, key_mask, cache)
        part = self._expert_list[index].attend(q, keys, values, None, attn_bias=attn_bias, **call)
        if self.capture_expert_outputs:
            self.last_expert_outputs[index] = part
        return part

    def _expert_inputs(self, index, k, v, t, scale, causal, key_mask, cache):
        """Keys, values and keyword arguments an expert attends with. With a cache, the linear expert
        reads this call's keys plus its state over the earlier ones; the hybrid, decoding, reads its
        window from the cache and the older keys through its (lagging) state."""
        call = dict(scale=scale, causal=causal, key_mask=key_mask)
        if cache is None or index != self.kernel_index:
            return k, v, call
        end = self._state_end(t, k.shape[2])
        if end is not None:
            call["state"] = self.kernel_state(cache, k, v, key_mask, end)
        if isinstance(self._expert_list[index], HybridAttention):
            return k, v, call
        call["key_mask"] = None if key_mask is None else key_mask[:, -t:]
        return k[:, :, -t:], v[:, :, -t:], call

    def _state_end(self, t: int, n_keys: int) -> Optional[int]:
        """Where the kernel expert's state ends for t queries over n_keys keys: before this call's keys
        for the linear expert; for the hybrid, decoding, left of its window (None: it reads no state)."""
        expert = self._expert_list[self.kernel_index]
        if isinstance(expert, HybridAttention):
            return expert.state_end(n_keys - 1) if t == 1 else None
        return n_keys - t

    def kernel_state(self, cache: CacheInputs, k, v, key_mask, end: int, advance=None):
        """The kernel expert's state over keys start .. end-1 (indices into `k`, the keys so far),
        caught up from `k`, `v` and stored back. Returns (S, z). `advance(k, v, (S, z))`: how the
        state takes in keys (default: the expert's torch code; the fast path passes its kernel)."""
        expert = self._expert_list[self.kernel_index]
        held = cache.store.get()
        if held is None or held[2] > end + cache.offset:  # none yet, or the cache was rolled back below it
            b, hkv, _, d = k.shape
            f = expert.k_map(k.new_zeros(1, hkv, 1, d, dtype=torch.float32)).shape[-1]
            zeros = k.new_zeros(b, hkv, f, d, dtype=torch.float32), k.new_zeros(b, hkv, f, dtype=torch.float32)
            held = (*zeros, getattr(expert, "state_start", 0) + cache.offset)
        s, z, seen = held
        first = seen - cache.offset
        if first < 0:
            raise RuntimeError("the kernel expert's state lags behind keys the cache has dropped")
        if first < end:
            mask = None if key_mask is None else key_mask[:, first:end]
            if advance is None:
                s, z = expert.advance_state(k[:, :, first:end], v[:, :, first:end], mask, (s, z))
            else:
                s, z = advance(k[:, :, first:end], v[:, :, first:end], (s, z))
            cache.store.set(s, z, end + cache.offset)
        return s, z

    def _one_expert_per_token(self) -> bool:
        """Inference with hard top-1 routes: every token's weight is 1 on exactly one expert."""
        hard = self.routing_mode == "hard" or (self.routing_mode == "auto" and self.uncertain_route == "full")
        return not self.training and (self.forced_expert is not None or hard)

    def _kernels(self, q: torch.Tensor, causal: bool, key_mask, attn_bias) -> Optional[str]:
        """The kernel backend that serves this call, or None for the torch path."""
        if not q.is_cuda or not self._one_expert_per_token():
            return None
        backend = resolve_backend(self.backend, q.device)
        if backend in ("torch", "sdpa"):
            return None
        try:  # absolute: a remote-code copy of this file runs without the package, on the torch path
            from ma_convert.kernels import routed
        except ImportError:
            return None
        if routed.unsupported_reason(self.routed_spec(), q, causal=causal, key_mask=key_mask, attn_bias=attn_bias):
            return None
        return backend

    def _fast_path(self, q, k, v, weights, scale, causal, key_mask, attn_bias, cache) -> Optional[torch.Tensor]:
        """The GPU kernels of `ma_convert.kernels` when the backend and the call allow (else None)."""
        if self._kernels(q, causal, key_mask, attn_bias) is None:
            return None
        from ma_convert.kernels import routed

        routes = weights.argmax(-1) if weights.is_floating_point() else weights
        state = None
        end = None if cache is None else self._state_end(q.shape[2], k.shape[2])
        if end is not None:  # (for the linear expert, the kernels return the state after this call's keys)
            from ma_convert.kernels.triton_decode import advance_state

            weight = self.routed_spec().k_map_weight  # caught up by the state kernel (no key mask here)
            state = self.kernel_state(cache, k, v, key_mask, end, lambda ks, vs, sz: advance_state(weight, ks, vs, sz))
        heads, next_state = routed.routed_heads(self.routed_spec(), q, k, v, routes, scale=scale, state=state)
        if next_state is not None and cache is not None:
            cache.store.set(*next_state, k.shape[2] + cache.offset)
        return heads

    # ------------------------------------------------------------------ forward
    def note_all_full(self, shape) -> None:
        """Record a call that ran every token on the full expert outside `forward` (a static cache)."""
        self._last.decision = _Decision(self, shape, None, only=self.full_index)

    def runs_all_full(self, q: torch.Tensor, n_keys: int, causal: bool = True, key_mask=None, attn_bias=None) -> bool:
        """Whether this call is the original attention on every token: forced to the full expert, all
        of it inside `full_tail`, or hard routing on the fast path with fewer than `dense_below` keys
        (prompt and cache)."""
        if isinstance(self.forced_expert, int):
            return self.forced_expert == self.full_index
        if self.forced_expert is not None:
            return False
        if not self.training and self.routing_mode != "soft" and self.full_tail >= q.shape[2]:
            return True  # the whole call is the full tail (a decode step, with full_tail > 0)
        if n_keys >= dense_below_keys(self.dense_below):
            return False
        return self._kernels(q, causal, key_mask, attn_bias) is not None

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
        cache: Optional[CacheInputs] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Route the tokens of `x` (B, T, D) and attend with heads q (B, Hq, T, d), k/v (B, Hkv, Tk, d).

        `positions` (B, T) or (T,) feed the router's position feature (default: the last T key
        indices, which is right without padding; pass position ids otherwise).
        `query_valid` (B, T) marks real tokens, for the loss and the statistics. With `cache`, k/v
        start with the cached keys (see `run_experts`).
        Returns the mixed head outputs (B, Hq, T, d) and the routing weights: (B, T, K), or (B, T)
        routes under hard inference routing (int32 on the GPU fast path), None when every token ran on
        the full expert unrouted.
        """
        last = self._last
        last.heads = dict(q=q.detach(), k=k.detach(), v=v.detach(), scale=scale, causal=causal,
                          key_mask=key_mask, attn_bias=attn_bias) if self.capture_heads else None
        if self._head_experts_only and self.runs_all_full(q, k.shape[2], causal, key_mask, attn_bias):
            # No router, no statistics until they are read: the original attention at its own cost.
            last.decision = _Decision(self, x.shape[:2], query_valid, only=self.full_index)
            heads = self._run_dense(self.full_index, q, k, v, scale, causal, key_mask, attn_bias, None)
            weights = None
        else:
            if positions is None:  # the queries are the last T keys
                positions = torch.arange(k.shape[2] - x.shape[1], k.shape[2], device=x.device)
            if self._lean_hard_routing():
                fused = self._kernels(q, causal, key_mask, attn_bias) is not None
                weights, raw = self.route_hard(x, positions, fused=fused)  # run_experts takes per-token routes too
                last.decision = _Decision(self, x.shape[:2], query_valid, raw=raw, routes=weights)
            else:
                weights, chosen, r = self.route(x, positions)
                last.decision = _Decision(self, x.shape[:2], query_valid, weights=weights, chosen=chosen, r=r)
            heads = self.run_experts(
                q, k, v, weights, scale=scale, causal=causal, key_mask=key_mask, attn_bias=attn_bias, cache=cache
            )
        if cache is not None and cache.eager and self.kernel_index is not None:
            # Where the cache drops old keys, the state takes in this call's keys now, whatever ran.
            self.kernel_state(cache, k, v, key_mask, k.shape[2])
        return heads, weights

    def extra_repr(self) -> str:
        return f"experts={self.expert_names}, costs={self.cfg.expert_costs}, mode={self.routing_mode}"


def dense_below_keys(dense_below: Optional[int]) -> int:
    """Contexts shorter than this run all-full on the fast path (the policy's `dense_below`, else the
    measured default)."""
    return DENSE_BELOW if dense_below is None else dense_below
