"""Hard-routing plumbing: group the tokens of each expert, gather their queries, scatter back.

Rows of a batch route different numbers of tokens to an expert; each expert's queries are packed
to the longest row. Padding slots have position -1: experts skip them when sizing their work, and
they carry weight zero on the way back.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.gather import gather_queries, group_tokens  # noqa: F401  (re-exported: the torch path uses them)


def gather_bias_rows(attn_bias: Optional[torch.Tensor], tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows of an additive bias (B|1, H|1, T|1, Tk) for the gathered queries."""
    if attn_bias is None or attn_bias.shape[-2] == 1:
        return attn_bias
    bias = attn_bias.expand(tokens.shape[0], *attn_bias.shape[1:])
    idx = tokens.clamp_min(0)[:, None, :, None].expand(bias.shape[0], bias.shape[1], tokens.shape[1], bias.shape[-1])
    return bias.gather(2, idx)


def scatter_weighted(out: torch.Tensor, part: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> None:
    """out[:, :, tokens] += w * part, in place, with w the tokens' routing weights (B, T);
    padding slots add nothing."""
    b, h, n, d = part.shape
    valid = tokens >= 0
    index = tokens.clamp_min(0)
    w = torch.where(valid, weights.gather(1, index), 0.0)
    out.scatter_add_(2, index[:, None, :, None].expand(b, h, n, d), part * w[:, None, :, None].to(part.dtype))
