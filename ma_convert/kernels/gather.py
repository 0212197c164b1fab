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
