"""Grouping routed tokens per expert and gathering their queries (torch ops)."""

from __future__ import annotations

import torch


def group_tokens(selected: torch.Tensor) -> torch.Tensor:
    """selected: (B, T) bool -> token indices (B, N) in position order, -1 in padding slots.
    One host sync: N, the longest row's count."""
    t = selected.shape[1]
    counts = selected.sum(1)
    n = int(counts.max())
    ar = torch.arange(t, device=selected.device)
    # Selected tokens sort first, each group in position order.
    order = torch.where(selected, ar, ar + t).argsort(dim=1)[:, :n]
    valid = torch.arange(n, device=selected.device) < counts[:, None]
    return torch.where(valid, order, -1)


def gather_queries(q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, N, d) at token indices (B, N); padding slots read token 0."""
    b, h, _, d = q.shape
    return q.gather(2, tokens.clamp_min(0)[:, None, :, None].expand(b, h, tokens.shape[1], d))
