"""Hard-routing plumbing: group the tokens of each expert, gather their queries, scatter back.

Rows of a batch route different numbers of tokens to an expert; each expert's queries are packed
to the longest row, and padding slots repeat that row's last routed position (so a query block's
key range stays tight) and carry weight zero on the way back.
"""

from __future__ import annotations

from typing import Optional

import torch


def group_tokens(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """selected: (B, T) bool -> key indices (B, N) in position order, and their validity (B, N)."""
    b, t = selected.shape
    counts = selected.sum(1)
    n = int(counts.max())
    ar = torch.arange(t, device=selected.device)
    # Selected tokens sort first, each group in position order.
    order = torch.where(selected, ar, ar + t).argsort(dim=1)[:, :n]
    valid = torch.arange(n, device=selected.device) < counts[:, None]
    last = order.gather(1, (counts - 1).clamp_min(0)[:, None])
    last = torch.where(counts[:, None] > 0, last, t - 1)
    return torch.where(valid, order, last), valid


def gather_queries(q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, N, d) at key indices q_pos (B, N)."""
    b, h, _, d = q.shape
    return q.gather(2, q_pos[:, None, :, None].expand(b, h, q_pos.shape[1], d))


def gather_bias_rows(attn_bias: Optional[torch.Tensor], q_pos: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows of an additive bias (B|1, H|1, T|1, Tk) for the gathered queries."""
    if attn_bias is None or attn_bias.shape[-2] == 1:
        return attn_bias
    bias = attn_bias.expand(q_pos.shape[0], *attn_bias.shape[1:])
    idx = q_pos[:, None, :, None].expand(bias.shape[0], bias.shape[1], q_pos.shape[1], bias.shape[-1])
    return bias.gather(2, idx)


def scatter_weighted(out: torch.Tensor, part: torch.Tensor, q_pos: torch.Tensor, weight: torch.Tensor) -> None:
    """out[:, :, q_pos] += weight * part, in place; padding slots carry weight 0."""
    b, h, n, d = part.shape
    contrib = part * weight[:, None, :, None].to(part.dtype)
    out.scatter_add_(2, q_pos[:, None, :, None].expand(b, h, n, d), contrib)
