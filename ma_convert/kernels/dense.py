"""One dense causal softmax call: every token is a query and sees its earlier keys.

Used when a softmax expert runs on all tokens (short sequences, or every token routed to it),
where a library's dense kernel beats gathering. flash_attn and xformers are imported only when
asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import BACKEND_NAMES


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    backend: str,
    window: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention of q (B, Hq, T, d) over k, v (B, Hkv, T, d); returns (B, Hq, T, d).

    Query t is key t. ``window`` W keeps each query's last W keys (itself included); None keeps
    all earlier keys. GQA: ``Hq`` a multiple of ``Hkv``, query head h reads kv head h // (Hq/Hkv).
    flash_attn and xformers run their kernel for 16-bit inputs; every other case (and every other
    backend, whose own kernels are for gathered queries) is PyTorch SDPA.
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if window is not None and window >= q.shape[2]:
        window = None  # a window as long as the sequence is plain causal attention
    half = q.dtype in (torch.float16, torch.bfloat16)  # both libraries run 16-bit inputs only
    if backend == "flash_attn" and half:
        return _flash_attn(q, k, v, scale=scale, window=window)
    if backend == "xformers" and half and window is None:  # windows take SDPA below
        return _xformers(q, k, v, scale=scale)
    return _sdpa(q, k, v, scale=scale, window=window)


def _sdpa(q, k, v, *, scale, window):
    gqa = q.shape[1] != k.shape[1]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    t = torch.arange(q.shape[2], device=q.device)
    offset = t[:, None] - t[None, :]  # query index minus key index
    band = (offset >= 0) & (offset < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale, enable_gqa=gqa)


def _flash_attn(q, k, v, *, scale, window):
    from flash_attn import flash_attn_func

    # flash_attn wants (B, T, H, d) and handles GQA itself; window_size=(left, right) in keys.
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        softmax_scale=scale,
        causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
    )
    return out.transpose(1, 2)


def _xformers(q, k, v, *, scale):
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    group = q.shape[1] // k.shape[1]
    if group > 1:  # repeat each kv head for its query heads, as SDPA's enable_gqa does
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # xformers also wants (B, T, H, d).
    out = memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=LowerTriangularMask(), scale=scale
    )
    return out.transpose(1, 2)
