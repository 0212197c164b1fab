"""Real attention cost: the attention work each expert did in a forward, over full attention's.

Work is counted in query-key pairs. A pair of softmax attention is one score and its value
accumulation, 2d multiply-adds for head size d. Per layer and row of T queries at key positions
p = 0 .. T-1 (each sees p + 1 keys):

- full: p + 1 pairs (min(p + 1, w) for a base model with its own window w);
- local (window W, S sinks): min(p + 1, W) + min(S, max(0, p + 1 - W)) pairs;
- linear (F features): per query its feature map (Hedgehog: d^2 multiply-adds, F = 2d; ELU+1: d,
  F = d) and its read of the state (F d), plus the keys of its own chunk of C keys walked
  quadratically, ((p mod C) + 1) (F + d) multiply-adds; per key of the sequence its feature map and
  its write to the state, the same as a query's first two terms, charged once per layer and row
  whenever any token of the row uses the kernel expert (all divided by 2d, a pair);
- hybrid (window W, S sinks): the exact part as local, and the linear part for the keys left of
  its window (queries with p >= W + S).

Real cost = work / full causal attention's work over the same queries, sum_p min(p + 1, w).
Unlike the projected cost (fixed 1.0 / 0.15 / 0.30 per token), it depends on the length: a
512-key window is 44% of full attention's pairs at 2k and 12% at 8k.
"""

from __future__ import annotations

import torch

from .experts.full import FullAttention
from .experts.hybrid import HybridAttention
from .experts.linear import HedgehogFeatureMap, LinearAttention
from .experts.local import LocalAttention

NO_WINDOW = 1 << 62


def _exact_pairs(positions: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Keys a softmax query at `positions` reads (double): its last `window` and up to `sinks` first keys."""
    seen = positions + 1
    return (torch.clamp(seen, max=window) + torch.clamp(seen - window, min=0).clamp(max=sinks)).double()


def _full_work(module, positions: torch.Tensor) -> torch.Tensor:
    """Pairs of full causal attention (with the base model's own window, if any): the real cost's unit."""
    return _exact_pairs(positions, module.cfg.full_window or NO_WINDOW)


def _kernel_work(expert: LinearAttention, d: int) -> tuple[float, float]:
    """In pairs of 2d multiply-adds: one token's feature map and its state read (or write), and one key
    walked inside the chunk (phi(q) . phi(k) and its value, F + d)."""
    features, feature_map = (2 * d, d * d) if isinstance(expert.q_map, HedgehogFeatureMap) else (d, d)
    return (features * d + feature_map) / (2 * d), (features + d) / (2 * d)


def expert_work(expert, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Pairs of work per query at key positions `positions` (any shape, long) on `expert`
    (without the kernel experts' per-key work, see `key_work`). Custom experts count as full."""
    p = positions.long()
    if isinstance(expert, LocalAttention):
        return _exact_pairs(p, expert.window, expert.sinks)
    if not isinstance(expert, LinearAttention):  # full, or a custom expert
        window = expert.window if isinstance(expert, FullAttention) else None
        return _exact_pairs(p, window or NO_WINDOW)
    per_token, chunk_pair = _kernel_work(expert, head_dim)
    if isinstance(expert, HybridAttention):
        kernel_keys = p - expert.window + 1 - expert.sinks  # keys left of the window, after the sinks
        walk = torch.remainder(kernel_keys.clamp(min=1) - 1, expert.chunk) + 1
        return _exact_pairs(p, expert.window, expert.sinks) + (kernel_keys > 0) * (per_token + walk * chunk_pair)
    return per_token + (torch.remainder(p, expert.chunk) + 1).double() * chunk_pair


def key_work(expert, n_keys: int, head_dim: int) -> float:
    """The kernel experts' per-key work (feature map and state write) over `n_keys` keys, in pairs."""
    if not isinstance(expert, LinearAttention):
        return 0.0
    return n_keys * _kernel_work(expert, head_dim)[0]


def routed_work(module, ran: torch.Tensor, n_keys: int) -> tuple[float, float]:
    """(work, full attention's work) in pairs of one module's forward: `ran` (B, T, K) bool, the
    experts each query ran on (several under soft routing), or (B, T) routes, one expert each; the
    queries are the last T of `n_keys` keys. Summed over rows; per head (every head does the same)."""
    if ran.dim() == 2:
        ran = torch.nn.functional.one_hot(ran.long(), len(module.experts)).bool()
    b, t, _ = ran.shape
    positions = torch.arange(n_keys - t, n_keys, device=ran.device).expand(b, t)
    head_dim = module.cfg.d_head
    work = 0.0
    for index, expert in enumerate(module.experts):
        chosen = ran[..., index]
        if not bool(chosen.any()):
            continue
        work += float(expert_work(expert, positions[chosen], head_dim).sum())
        rows_using = int(chosen.any(dim=1).sum())
        work += rows_using * key_work(expert, n_keys, head_dim)
    return work, float(_full_work(module, positions).sum())


def token_costs(module, n_queries: int, device=None) -> torch.Tensor:
    """(T, K) the real cost of each query position 0 .. T-1 on each expert: its pairs of work over
    the mean pairs of full causal attention per query at this length. A hard routing's mean over
    tokens of its chosen entries is its real cost, less the kernel experts' per-key work (paid once
    per row, whatever the routing; `routed_work` counts it). What the training objective's cost
    term charges with `cost_unit="real"`: cheap experts are worth more the later the token."""
    positions = torch.arange(n_queries, device=device)
    work = torch.stack([expert_work(e, positions, module.cfg.d_head) for e in module.experts], dim=-1)
    return (work / _full_work(module, positions).mean()).float()


def model_real_cost(modules, n_keys: int, *, routes: bool = False) -> float:
    """Real attention cost of the modules' last forward (`n_keys` keys per row, no cache): of the
    experts that ran (soft routing runs several per token), or with `routes`, of the hard routes
    (each token's top expert), which is what a routed model at inference does."""
    done = [routed_work(m, m.last_routes if routes else m.last_experts_run, n_keys) for m in modules]
    return sum(w for w, _ in done) / sum(f for _, f in done)


def cheapest_real_cost(modules, n_queries: int) -> float:
    """The lowest real cost any routing reaches at this length: every token on its cheapest expert.
    A window as long as the sequence is no cheaper than full attention, so a real-cost budget below
    this cannot be met."""
    return sum(float(token_costs(m, n_queries).min(-1).values.mean()) for m in modules) / len(modules)
