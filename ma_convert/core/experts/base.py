"""Expert base classes.

Two kinds of expert share one router:

- :class:`AttentionExpert` is the seed API: ``forward(x, mask)`` maps hidden states (B, T, D) to
  hidden states and owns whatever projections it needs. Custom experts subclass it.
- :class:`HeadAttentionExpert` is the kernel-level API of the built-in experts: ``attend`` takes
  already projected heads (q, k, v) and the true key index of every query. Converted models use it
  so that all experts share the original Q/K/V/O projections, and hard routing can hand an expert
  only its own queries.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentionExpert(nn.Module):
    """An attention expert with a normalised compute cost (full softmax attention is 1.0)."""

    _cost: float = 1.0
    name: str = "custom"

    @property
    def cost(self) -> float:
        return float(self._cost)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


class HeadAttentionExpert(AttentionExpert):
    """Built-in expert working on projected heads.

    ``attend(q, k, v, q_pos, ...)``:

    - ``q``: (B, Hq, N, d); ``k``, ``v``: (B, Hkv, Tk, d) with ``Hq % Hkv == 0`` (GQA).
    - ``q_pos``: (B, N) long, the key index each query sits at (causality and windows are measured
      in key indices). ``None`` means the queries are the last N keys, in order. A negative entry
      marks a padding slot (rows of a batch route different numbers of tokens): its output is
      ignored, so it must only stay finite and must not enlarge the work.
    - ``causal``: queries see keys at or before their own index only.
    - ``key_mask``: (B, Tk) bool, False for padding keys nobody may see.
    - ``attn_bias``: additive float bias broadcastable to (B, Hq, N, Tk) (ALiBi, user masks). The
      softmax experts add it; the linear expert cannot and uses only ``key_mask``.

    Returns (B, Hq, N, d). A query that may see no key at all gets zeros.

    A ``recurrent`` expert (linear attention) summarises past keys in a state instead of reading
    them: its ``attend`` also takes ``state`` (the summary of the keys before ``k``) and it has
    ``advance_state(k, v, key_mask, state)``.
    """

    recurrent = False

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: Optional[torch.Tensor] = None,
        *,
        scale: Optional[float] = None,
        causal: bool = True,
        key_mask: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args, **kwargs) -> torch.Tensor:  # built-ins are called through attend
        return self.attend(*args, **kwargs)


def dense_positions(n_queries: int, n_keys: int, batch: int, device: torch.device) -> torch.Tensor:
    """Key indices of N queries that are the last N keys: (B, N)."""
    return torch.arange(n_keys - n_queries, n_keys, device=device).expand(batch, n_queries)


def allowed_keys(
    q_pos: torch.Tensor,
    key_index: torch.Tensor,
    *,
    causal: bool,
    window: Optional[int] = None,
    sinks: int = 0,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean (B, 1, N, Tk') mask of the keys `key_index` (Tk',) each query may see.

    `window` keeps keys within `window` tokens of the query (the query included, both sides when
    not causal); keys below `sinks` stay visible regardless. `key_mask` is (B, Tk') here.
    """
    qp = q_pos[:, None, :, None]
    kj = key_index[None, None, None, :]
    ok = torch.ones((), dtype=torch.bool, device=q_pos.device)
    if causal:
        ok = kj <= qp
    if window is not None:
        near = (qp - kj < window) & (kj - qp < (1 if causal else window))
        if sinks:
            near = near | (kj < sinks)
        ok = ok & near
    if key_mask is not None:
        ok = ok & key_mask[:, None, None, :]
    return ok.expand(q_pos.shape[0], 1, q_pos.shape[1], key_index.shape[0])


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: Optional[float],
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    may_empty_rows: bool = True,
) -> torch.Tensor:
    """SDPA under a boolean mask (and optional additive bias); rows with no key give zeros.

    Causal and window masks always let a query see itself, so only padding masks and biases can
    empty a row. An empty row would make softmax NaN (and its gradient NaN), so such rows attend
    to key 0 and are zeroed afterwards.
    """
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:
        # SDPA's memory-efficient kernel takes masks but not enable_gqa; with it, a masked GQA call
        # falls back to the unfused math path (several kernels and a T x Tk score matrix per call).
        groups = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), False
    if attn_bias is None and not may_empty_rows:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    if attn_bias is not None:  # keys a bias sets to -inf are masked keys too
        allowed = allowed & (attn_bias != float("-inf"))
    has_key = allowed.any(-1, keepdim=True)  # (B, 1|H, N, 1)
    first = torch.zeros_like(allowed)
    first[..., 0] = True
    safe = torch.where(has_key, allowed, first)
    mask = safe
    if attn_bias is not None:
        mask = torch.where(safe, torch.where(has_key, attn_bias.to(q.dtype), 0.0), float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out.masked_fill(~has_key, 0.0)


def _sinks_and_window(k, v, lo: int, hi: int, n_sinks: int, scratch):
    """A block's keys and values: its `n_sinks` sinks, then its window lo..hi-1.

    Where the sinks are the keys just before the window (lo <= sinks) that is one slice. Otherwise,
    with `scratch` (copies of k and v), the sinks are written into the slots just below the window
    and the block reads one slice: blocks come in order of their windows, so a later block never
    reads those slots. This saves a copy of every window (most of a CPU local layer's overhead).
    Without scratch (gradients flow), the two parts are concatenated.
    """
    if n_sinks == 0 or n_sinks == lo:
        return k[:, :, lo - n_sinks:hi], v[:, :, lo - n_sinks:hi]
    if scratch is None:
        return (torch.cat([k[:, :, :n_sinks], k[:, :, lo:hi]], dim=2),
                torch.cat([v[:, :, :n_sinks], v[:, :, lo:hi]], dim=2))
    ks, vs = scratch
    ks[:, :, lo - n_sinks:lo] = k[:, :, :n_sinks]
    vs[:, :, lo - n_sinks:lo] = v[:, :, :n_sinks]
    return ks[:, :, lo - n_sinks:hi], vs[:, :, lo - n_sinks:hi]


def blocked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    causal: bool,
    scale: Optional[float],
    window: Optional[int] = None,
    sinks: int = 0,
    key_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    block: int = 256,
    dense: bool = False,
) -> torch.Tensor:
    """Softmax attention for queries at arbitrary key indices, one query block at a time.

    Each block reads only the key range its queries can see (up to the block's last query when
    causal, and the window when local), so gathered queries cost what they use. Queries are
    expected sorted by position, which keeps each block's key range tight.
    """
    n, tk = q.shape[2], k.shape[2]
    n_blocks = -(-n // block)
    per_block = F.pad(q_pos, (0, n_blocks * block - n), value=-1).view(q_pos.shape[0], n_blocks, block)
    # Padding slots (-1) neither lower a block's first position nor raise its last.
    lows = torch.where(per_block >= 0, per_block, tk).amin(dim=(0, 2)).tolist()  # one host sync
    highs = per_block.amax(dim=(0, 2)).tolist()
    outs, masks = [], {}
    scratch = None  # inference, dense: copies of k and v that take each block's sinks in place (see below)
    grads = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)  # in-place writes would break them
    if sinks and window is not None and dense and n_blocks > 1 and not grads:
        scratch = k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)
    for b, (p_lo, p_hi) in enumerate(zip(lows, highs)):
        rows = slice(b * block, min((b + 1) * block, n))
        if p_hi < 0:  # padding slots only
            outs.append(q.new_zeros(*q.shape[:2], rows.stop - rows.start, v.shape[-1]))
            continue
        lo = 0 if window is None else max(0, p_lo - window + 1)
        hi = p_hi + 1 if causal else (tk if window is None else min(tk, p_hi + window))
        n_sinks = min(sinks, lo)
        kb, vb = _sinks_and_window(k, v, lo, hi, n_sinks, scratch)
        shape = (rows.stop - rows.start, p_lo - lo, hi - lo, n_sinks)  # a dense block's mask depends on these only
        allowed = masks.get(shape) if dense and key_mask is None else None
        key_index = None
        if allowed is None or attn_bias is not None:
            key_index = torch.arange(lo, hi, device=q.device)
            if n_sinks:
                key_index = torch.cat([torch.arange(n_sinks, device=q.device), key_index])
        if allowed is None:
            allowed = allowed_keys(
                q_pos[:, rows].clamp_min(p_lo),  # a padding slot acts as the block's first query
                key_index,
                causal=causal,
                window=window,
                sinks=sinks,
                key_mask=None if key_mask is None else key_mask[:, key_index],
            )
            masks[shape] = allowed
        bias = None
        if attn_bias is not None:
            bias = attn_bias if attn_bias.shape[-2] == 1 else attn_bias[..., rows, :]
            bias = bias.index_select(-1, key_index)
        outs.append(
            softmax_attention(
                q[:, :, rows], kb, vb, allowed, scale=scale, attn_bias=bias, dropout_p=dropout_p,
                may_empty_rows=key_mask is not None,
            )
        )
    return torch.cat(outs, dim=2)
