"""Model-level controls over every Meta-Attention module inside a model (or a single layer)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from ..kernels.backends import check_backend
from .meta_attention import MetaAttention
from .objective import ObjectiveWeights
from .policy import RoutingPolicy
from .stats import RoutingStats


def meta_attention_modules(model: nn.Module) -> list[MetaAttention]:
    """Every `MetaAttention` inside `model` (the model itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, MetaAttention)]


def _require_modules(model: nn.Module) -> list[MetaAttention]:
    found = meta_attention_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} contains no Meta-Attention module; convert or patch it first")
    return found


@contextlib.contextmanager
def force_expert(model: nn.Module, expert: int | str | torch.Tensor = "full") -> Iterator[nn.Module]:
    """Route every token of every Meta-Attention module in `model` to one expert, inside the block.

    ``with force_expert(model, "full"):`` gives the original attention exactly (no router runs).
    `expert` is a name, an index, or a (B|1, T) LongTensor of per-token expert indices (a fixed
    routing mix, for benchmarks and tests).
    """
    modules = _require_modules(model)
    if isinstance(expert, torch.Tensor):
        n = min(len(m.experts) for m in modules)
        if expert.dtype not in (torch.int32, torch.int64) or expert.numel() == 0 or int(expert.min()) < 0 or int(expert.max()) >= n:
            raise ValueError(f"per-token routes must be integer expert indices in [0, {n})")
        indices = [expert.long()] * len(modules)
    else:
        indices = [m.expert_index(expert) for m in modules]  # validate everything before changing anything
    previous = [m.forced_expert for m in modules]
    try:
        for m, i in zip(modules, indices):
            m.forced_expert = i
        yield model
    finally:
        for m, p in zip(modules, previous):
            m.forced_expert = p


def set_routing_mode(
    model: nn.Module,
    mode: str,
    *,
    uncertainty_threshold: Optional[float] = None,
    uncertain_route: Optional[str] = None,
    full_tail: Optional[int] = None,
    backend: Optional[str] = None,
) -> None:
    """Switch every Meta-Attention module to "soft", "hard" or "auto" routing, without reloading; the
    other `RoutingPolicy` settings given change too (None: kept; `set_routing_policy` sets any).

    `full_tail`: at inference, the last this-many tokens of every forward (so every generated token)
    go to the full expert (`RoutingPolicy.full_tail`)."""
    given = dict(uncertainty_threshold=uncertainty_threshold, uncertain_route=uncertain_route, full_tail=full_tail,
                 backend=backend)
    set_routing_policy(model, mode=mode, **{k: v for k, v in given.items() if v is not None})


def set_routing_policy(model: nn.Module, policy: Optional[RoutingPolicy] = None, **changes: Any) -> None:
    """Give every Meta-Attention module `policy`, or change the named fields of each module's own
    (``set_routing_policy(model, dense_below=0)``). Everything is checked before anything changes."""
    modules = _require_modules(model)
    if policy is not None and changes:
        raise ValueError("give a RoutingPolicy or the fields to change, not both")
    policies = [policy if policy is not None else m.policy.replace(**changes) for m in modules]
    for p in policies:
        check_backend(p.backend)
    for m, p in zip(modules, policies):
        m.set_policy(p)


@contextlib.contextmanager
def routing_policy(model: nn.Module, policy: Optional[RoutingPolicy] = None, **changes: Any) -> Iterator[nn.Module]:
    """Inside the block, route as `set_routing_policy(model, policy, **changes)` does; each module's
    previous policy comes back on exit. ``with routing_policy(model, mode="auto", uncertainty_threshold=0.3):``"""
    modules = _require_modules(model)
    previous = [m.policy for m in modules]
    set_routing_policy(model, policy, **changes)
    try:
        yield model
    finally:
        for m, p in zip(modules, previous):
            m.set_policy(p)


def set_objective_weights(model: nn.Module, weights: Optional[ObjectiveWeights] = None, *,
                          start_at_prior: bool = False, **changes: Any) -> None:
    """Give every Meta-Attention module in `model` (or a layer) the training objective's `weights`, or
    change the named ones of each module's own (``set_objective_weights(model, cost_lambda=0.05)``).
    `start_at_prior`: untrained Bayesian routers also start routing at the (new) prior."""
    modules = _require_modules(model)
    if weights is not None and changes:
        raise ValueError("give ObjectiveWeights or the weights to change, not both")
    chosen = [weights if weights is not None else m.objective_weights.replace(**changes) for m in modules]
    for m, w in zip(modules, chosen):
        m.set_objective_weights(w, start_at_prior=start_at_prior)


def routing_stats(model: nn.Module) -> list[RoutingStats]:
    """Per-module `RoutingStats` of the last forward, in module order, for the modules that routed
    (aggregate with `RoutingStats.aggregate`)."""
    stats = [s for s in (m.last_stats for m in _require_modules(model)) if s is not None]
    if not stats:
        raise RuntimeError("no forward pass has run through the Meta-Attention modules yet")
    return stats


def collect_aux_losses(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary (ELBO) losses of the last forward, to add to the task loss."""
    losses = [loss for loss in (m.last_aux_loss for m in _require_modules(model)) if loss is not None]
    if not losses:
        raise RuntimeError("no forward pass has run through the Meta-Attention modules yet")
    return torch.stack([loss.float() for loss in losses]).sum()
