"""FlexAttention for the softmax experts (full and local) on gathered, routed queries.

The queries of one expert are a sorted subset of the tokens. Their key indices go into a
position table that the ``mask_mod`` reads, and the block mask is built analytically from each
query block's positions (a few small tensor ops): ``create_block_mask`` evaluates the mask_mod on
every (query, key) pair, which costs more than the attention itself here.

Compiled (torch.compile) on CUDA. Elsewhere flex_attention runs eagerly, which materialises the
whole score matrix, ignores the block mask and has no backward on the CPU: that is for tests only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's block size, for queries and keys alike


@functools.cache
def _compiled_flex():
    # One compiled callable for the process: each torch.compile call would compile anew.
    return torch.compile(flex_attention)


def flex_routed_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: torch.Tensor,
    offset: int,
    *,
    window: int | None,
    sinks: int,
    scale: float | None,
) -> torch.Tensor:
    """Causal softmax attention for gathered queries; returns (B, Hq, N, d).

    - ``q``: (B, Hq, N, d), N > 0, the gathered queries; ``k``, ``v``: (B, Hkv, Tk, d), ``Hq % Hkv == 0``.
    - ``tokens``: (B, N) long, each query's token index, ascending per row, -1 in trailing padding
      slots (whose outputs are finite and meaningless). Query key index = ``tokens + offset``.
    - ``window``: None for the full expert; W for the local one (the last W keys, itself included)
      with the first ``sinks`` keys always visible.

    No key padding mask or additive bias: callers with those take the torch path.
    """
    n = q.shape[2]
    n_keys = k.shape[2]
    n_pad = -(-n // BLOCK) * BLOCK
    pos = query_positions(tokens, offset, n_pad)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    block_mask = routed_block_mask(pos, n_keys, window=window, sinks=sinks, backward=needs_grad)
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(F.pad(q, (0, 0, 0, n_pad - n)), k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[:, :, :n]


def query_positions(tokens: torch.Tensor, offset: int, n_pad: int) -> torch.Tensor:
    """(B, n_pad) key index of every query slot, padding slots included.

    A padding slot takes the lowest position of its query block, so it neither widens the block's
    key range nor sees no key at all; a block of padding only sits at key 0.
    """
    b, n = tokens.shape
    pos = torch.where(tokens >= 0, tokens + offset, -1)
    pos = F.pad(pos, (0, n_pad - n), value=-1).view(b, n_pad // BLOCK, BLOCK)
    real = pos >= 0
    lowest = torch.where(real, pos, torch.iinfo(pos.dtype).max).amin(-1, keepdim=True)
    lowest = torch.where(real.any(-1, keepdim=True), lowest, 0)
    return torch.where(real, pos, lowest).view(b, n_pad)


def routed_block_mask(
    pos: torch.Tensor, n_keys: int, *, window: int | None, sinks: int = 0, backward: bool = False
) -> BlockMask:
    """BlockMask for queries at key indices `pos` (B, n_pad) over `n_keys` keys, built analytically.

    Per (row, query block) with positions in [lo, hi], a key block [a, e] is visited when some
    query of the block may see some key in it, and is *full* (the mask_mod is skipped) when every
    query sees every key (e <= lo, and for local max(a, sinks) >= hi - W + 1 or e < sinks).
    `backward` also builds the transposed tables the gradient needs.
    """
    b, n_pad = pos.shape
    per_block = pos.view(b, n_pad // BLOCK, BLOCK)
    lo = per_block.amin(-1, keepdim=True)  # (B, n_q_blocks, 1)
    hi = per_block.amax(-1, keepdim=True)
    first = torch.arange(0, n_keys, BLOCK, device=pos.device)  # first key of each key block
    last = (first + BLOCK).clamp_max(n_keys) - 1
    visit = first <= hi  # causal: the full expert's block sees key blocks up to its last query
    full = last <= lo
    if window is not None:
        # A query at p sees some key of [a, e] iff a <= p <= e + W - 1. Counting the block's
        # positions in that range (not testing [lo, hi] against it) skips the key blocks in the
        # gap between clusters of routed tokens that share a query block.
        sorted_pos = per_block.sort(-1).values
        shape = (b, sorted_pos.shape[1], first.numel())
        below = torch.searchsorted(sorted_pos, first.expand(shape).contiguous())
        upto = torch.searchsorted(sorted_pos, (last + window - 1).expand(shape).contiguous(), right=True)
        visit = (upto > below) | (visit & (first < sinks))
        # Full: the highest query still sees the block's lowest key past the sinks.
        full = full & ((first.clamp_min(sinks) > hi - window) | (last < sinks))
    full = full & (first + BLOCK <= n_keys)  # a ragged last key block stays masked
    partial = visit & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=BLOCK,
        mask_mod=_mask_mod(pos, window, sinks),
        seq_lengths=(n_pad, n_keys),
        compute_q_blocks=backward,
    )


def _ordered(blocks: torch.Tensor):
    """(B, Q, K) bool -> counts (B, 1, Q) and key-block indices (B, 1, Q, K), listed ones first."""
    counts = blocks.sum(-1, dtype=torch.int32)
    # A stable sort of "not listed" puts the listed blocks first, in ascending order.
    indices = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def _mask_mod(pos: torch.Tensor, window: int | None, sinks: int):
    # Two functions rather than one with a huge window: the full expert's mask then captures no
    # key count, which would change every call and recompile.
    if window is None:

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= pos[b, q_idx]

        return causal

    def local(b, h, q_idx, kv_idx):
        p = pos[b, q_idx]
        return (kv_idx <= p) & ((p - kv_idx < window) | (kv_idx < sinks))

    return local
