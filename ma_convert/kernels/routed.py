"""Hard-routed attention on the GPU: every expert runs on its own tokens only.

`routed_heads` is what `MetaAttention.run_experts` calls at inference when every token has exactly
one expert (hard top-1 routing, or forced routes) and the inputs allow it (CUDA, fp16/bf16, no
padding mask or additive bias, the three built-in experts). It picks the kernels:

- prefill (T > 1): tokens are sorted by (expert, position) on the GPU, once; one Triton launch per
  expert (full, local, linear) runs it on its own tokens, reading their queries and writing their
  outputs in place. No host sync, except to decide the mostly-full mode.
- short prompts (below `DENSE_BELOW` tokens, or `MetaAttnConfig.dense_below`): gathering cannot
  beat one dense call there, so every token runs on the full expert, one causal SDPA (or
  flash-attn / xFormers) call: the original model's attention, at its speed. Set `dense_below=0`
  to route short prompts too (to measure routing quality, for instance).
- mostly-full routing: the full expert runs as one dense call on all tokens and the cheap experts
  overwrite their own rows; outputs stay exactly the routed ones.
- decode (one new token per row): each row reads only what its expert needs: the whole cache
  (full), its window (local) or the fp32 state (linear, updated with one batched matmul). No host
  sync, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.experts.full import FullAttention
from ..core.experts.linear import HedgehogFeatureMap, LinearAttention
from ..core.experts.local import LocalAttention
from . import triton_linear, triton_softmax
from .dense import dense_causal_attention
from .triton_softmax import NO_WINDOW

# Prompts shorter than this run all tokens on the full expert, one SDPA call (MetaAttnConfig.dense_below
# overrides): on an H100 gathering loses below ~8k tokens (benchmarks/results/attention_*.md).
DENSE_BELOW = 8192
# Above this share of full tokens in any row, the full expert runs as one dense call on all tokens
# and the cheap experts overwrite their own rows (outputs unchanged, fewer wasted launches).
MOSTLY_FULL = 0.6
# Triton launch settings per softmax expert (best of a sweep on an H100, d=128, bf16): the full
# expert's blocks walk long key ranges, the local expert's a window.
PREFILL_CONFIGS = {
    "full": dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    "local": dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
}


class ExpertTable:
    """Where the built-in experts sit in a MetaAttention, and their windows, on one device."""

    def __init__(self, meta, device: torch.device) -> None:
        self.full = self.linear = self.local = None
        for i, expert in enumerate(meta.experts):
            for name, cls in (("full", FullAttention), ("linear", LinearAttention), ("local", LocalAttention)):
                if type(expert) is cls:
                    setattr(self, name, i)
        n = len(meta.experts)
        # The kernels serve exactly the three built-in experts.
        self.supported = n == 3 and None not in (self.full, self.linear, self.local)
        windows, sinks = [0] * n, [0] * n
        if self.full is not None:
            windows[self.full] = meta.experts[self.full].window or NO_WINDOW
        if self.local is not None:
            windows[self.local] = meta.experts[self.local].window
            sinks[self.local] = meta.experts[self.local].sinks
        self.window_by_expert = torch.tensor(windows, dtype=torch.int32, device=device)
        self.sinks_by_expert = torch.tensor(sinks, dtype=torch.int32, device=device)
        # (expert, window, sinks) columns for the prefill kernel, one launch per expert.
        self.prefill_meta = {
            name: torch.tensor([[i], [windows[i]], [sinks[i]]], dtype=torch.int32, device=device)
            for name, i in (("full", self.full), ("local", self.local))
            if i is not None
        }



def _table(meta, device: torch.device) -> ExpertTable:
    cache = meta.__dict__.setdefault("_fast_tables", {})
    if device not in cache:
        cache[device] = ExpertTable(meta, device)
    return cache[device]


def short_prompt_limit(cfg) -> int:
    """Prompts shorter than this run all-full on the fast path (`MetaAttnConfig.dense_below`, else
    the measured `DENSE_BELOW`)."""
    return DENSE_BELOW if cfg.dense_below is None else cfg.dense_below


def unsupported_reason(meta, q: torch.Tensor, *, causal: bool, key_mask, attn_bias) -> Optional[str]:
    """Why the fast path cannot serve this call (None: it can)."""
    table = _table(meta, q.device)
    if not table.supported:
        return "the fast path serves the three built-in experts only"
    if meta.experts[table.linear].window:
        return "the fast path's linear kernels have no exact window (linear_window > 0)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "the fast path runs in fp16/bf16"
    if not causal or key_mask is not None or attn_bias is not None:
        return "the fast path covers causal attention without padding masks or additive biases"
    return None


def _feature_weight(expert: LinearAttention, which: str):
    fmap = getattr(expert, which)
    return fmap.weight if isinstance(fmap, HedgehogFeatureMap) else None


def routed_heads(
    meta,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routes: torch.Tensor,
    *,
    scale: Optional[float],
    backend: str = "triton",
    recurrent=None,
) -> torch.Tensor:
    """Heads (B, Hq, T, d) of hard-routed attention; routes (B, T) long, one expert per token
    (or (B, T, K) one-hot routing weights, read only where needed).

    q (B, Hq, T, d) are the last T of the keys k, v (B, Hkv, Tk, d). `recurrent` (a
    `RecurrentInputs`) gives the linear expert this step's keys and the state of earlier ones; its
    `next_state` is filled with the state after this step.
    """
    table = _table(meta, q.device)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    t = q.shape[2]
    if t == 1 and recurrent is not None and recurrent.state is not None:
        return _decode(meta, table, q, k, v, _as_routes(routes), scale, recurrent)
    if 1 < t < short_prompt_limit(meta.cfg) and k.shape[2] == t and table.full is not None:
        # A short prompt: all of it on the full expert, the original attention in one call. The
        # cache's linear state is still advanced by the caller (every token feeds it).
        return dense_causal_attention(q, k, v, scale=scale, backend=backend, window=meta.experts[table.full].window)
    return _prefill(meta, table, q, k, v, _as_routes(routes), scale, backend, recurrent)


def _as_routes(routes: torch.Tensor) -> torch.Tensor:
    return routes.argmax(-1) if routes.is_floating_point() else routes


def sort_by_expert(routes: torch.Tensor, n_experts: int):
    """Token indices grouped by expert, each group in position order (a counting sort, no host
    sync): perm (B, T) int32, and per expert its token count and where its group starts (B, E)."""
    experts = torch.arange(n_experts, device=routes.device)
    member = (routes.unsqueeze(1) == experts[:, None]).to(torch.int32)  # (B, E, T): scans run along T
    rank = member.cumsum(2, dtype=torch.int32).gather(1, routes.unsqueeze(1)).squeeze(1) - 1
    counts = member.sum(2, dtype=torch.int32)
    seg_start = counts.cumsum(1, dtype=torch.int32) - counts
    dest = seg_start.gather(1, routes) + rank
    tokens = torch.arange(routes.shape[1], device=routes.device, dtype=torch.int32).expand_as(dest)
    perm = torch.empty_like(dest).scatter_(1, dest.long(), tokens)
    return perm, counts, seg_start


def _linear_inputs(k, v, recurrent):
    if recurrent is None:
        return k, v, None
    return recurrent.key, recurrent.value, recurrent.state


def _prefill(meta, table, q, k, v, routes, scale, backend, recurrent):
    b, hq, t, d = q.shape
    n_experts = len(meta.experts)
    perm, counts, seg_start = sort_by_expert(routes, n_experts)
    out = torch.empty(b, t, hq, d, device=q.device, dtype=q.dtype)

    dense_full = False
    if table.full is not None and k.shape[2] == t:
        dense_full = int(counts[:, table.full].max()) > MOSTLY_FULL * t  # one host sync
    if dense_full:
        full = dense_causal_attention(q, k, v, scale=scale, backend=backend, window=meta.experts[table.full].window)
        out.copy_(full.transpose(1, 2))
    if backend == "flex":
        _flex_softmax(meta, table, q, k, v, routes, out, scale, include_full=not dense_full)
    else:
        for name, meta_columns in table.prefill_meta.items():
            if name == "full" and dense_full:
                continue
            triton_softmax.routed_softmax_prefill(
                q, k, v, out, perm, seg_start, counts, meta_columns, scale=scale, **PREFILL_CONFIGS[name]
            )

    if table.linear is not None:
        expert = meta.experts[table.linear]
        lk, lv, state = _linear_inputs(k, v, recurrent)
        if backend == "fla" and recurrent is None:
            _fla_linear(expert, q, lk, lv, routes == table.linear, out)
        else:
            phi_k, s, z, final = triton_linear.key_features_and_states(expert.k_map, lk, lv, state)
            triton_linear.routed_linear_prefill(
                q, phi_k, lv, (s, z), out, perm, seg_start, counts, table.linear,
                q_map_weight=_feature_weight(expert, "q_map"),
            )
            if recurrent is not None:
                recurrent.next_state = final
    return out.transpose(1, 2)


def _flex_softmax(meta, table, q, k, v, routes, out, scale, *, include_full: bool) -> None:
    """FlexAttention for the softmax experts on their gathered queries (one host sync each)."""
    from ..core.dispatch import gather_queries, group_tokens
    from .flex import flex_routed_softmax

    offset = k.shape[2] - q.shape[2]
    for index in (table.full if include_full else None, table.local):
        if index is None:
            continue
        tokens = group_tokens(routes == index)
        if tokens.shape[1] == 0:
            continue
        expert = meta.experts[index]
        part = flex_routed_softmax(
            gather_queries(q, tokens), k, v, tokens, offset, window=expert.window,
            sinks=getattr(expert, "sinks", 0), scale=scale,
        )
        valid = tokens >= 0
        rows = tokens.clamp_min(0)
        dst = out.gather(1, rows[:, :, None, None].expand(-1, -1, *out.shape[2:]))
        src = torch.where(valid[:, :, None, None], part.transpose(1, 2).to(out.dtype), dst)
        out.scatter_(1, rows[:, :, None, None].expand_as(src), src)


def _fla_linear(expert: LinearAttention, q, k, v, selected: torch.Tensor, out: torch.Tensor) -> None:
    """fla-core's chunked linear attention on all tokens (kv repeated per query head); the
    outputs of the linear expert's tokens are kept. The normaliser phi(q) . sum phi(k) rides along
    as an extra value column of ones (fla's own `normalize` sums over the wrong axis in the
    [B, T, H, K] layout, in fla-core 0.3.2)."""
    from fla.ops.linear_attn import chunk_linear_attn

    group = q.shape[1] // k.shape[1]
    d = v.shape[-1]
    phi_q = expert.q_map(q.float()).to(q.dtype)
    phi_k = expert.k_map(k.float()).to(q.dtype).repeat_interleave(group, dim=1)
    ones = torch.ones(*v.shape[:-1], 16, device=v.device, dtype=v.dtype)  # 16: a friendly width
    vv = torch.cat([v, ones], dim=-1).repeat_interleave(group, dim=1)
    o, _ = chunk_linear_attn(
        phi_q.transpose(1, 2), phi_k.transpose(1, 2), vv.transpose(1, 2), scale=1.0, normalize=False
    )
    o = o.float()
    o = o[..., :d] / o[..., d : d + 1].clamp_min(1e-6)
    out.copy_(torch.where(selected[:, :, None, None], o.to(out.dtype), out))


def _decode(meta, table, q, k, v, routes, scale, recurrent):
    routes = routes[:, 0]
    out = triton_softmax.routed_softmax_decode(
        q, k, v, routes.to(torch.int32), table.window_by_expert, table.sinks_by_expert, scale=scale
    )
    if table.linear is not None:
        expert = meta.experts[table.linear]
        lin, recurrent.next_state = linear_decode_step(expert, q, recurrent.key, recurrent.value, recurrent.state)
        out = torch.where((routes == table.linear)[:, None, None, None], lin, out)
    return out.to(q.dtype)


def linear_decode_step(expert: LinearAttention, q, k, v, state):
    """The linear expert for one new token per row: S += phi(k) v^T (one batched matmul), then
    phi(q) S / phi(q) z. q (B, Hq, 1, d); k, v (B, Hkv, 1, d); state (S, z) before this token.
    Returns the fp32 output and the state after it."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    phi_k = expert.k_map(k.float())  # (B, Hkv, 1, F)
    f = phi_k.shape[-1]
    s0, z0 = state[0].reshape(b * hkv, f, d), state[1]
    s = torch.baddbmm(s0, phi_k.reshape(b * hkv, 1, f).transpose(1, 2), v.float().reshape(b * hkv, 1, d))
    z = z0 + phi_k[:, :, 0]
    phi_q = expert.q_map(q.float()).reshape(b * hkv, hq // hkv, f)
    num = torch.bmm(phi_q, s)
    den = torch.bmm(phi_q, z.reshape(b * hkv, f, 1))
    lin = (num / den.clamp_min(1e-6)).reshape(b, hq, 1, d)
    return lin, (s.view(b, hkv, f, d), z)
