"""Reading user attention masks into what the experts take: causality, a key mask and a bias.

The softmax experts can apply any additive bias, but the linear expert only knows causality and
which keys exist. So a mask is split into the parts every expert honours (causal structure,
padding keys) and what is left over, which only the softmax experts apply.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

# An additive value at or below this blocks a key: its softmax weight underflows to zero anyway.
BLOCKED_AT = -1e4


def read_attention_mask(
    mask: torch.Tensor, *, true_means_blocked: bool
) -> tuple[bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Split an attention mask (B|1, H|1, T, Tk), bool or additive float.

    Returns ``(causal, key_mask, attn_bias)``: whether every future key is blocked; a (B|1, Tk)
    bool mask of keys that some query may see (None if all); and an additive bias carrying the
    rest of the mask (None when causality and the key mask already say everything).
    """
    if mask.dtype == torch.bool:
        blocked = mask if true_means_blocked else ~mask
        finite = None
    else:
        blocked = mask <= BLOCKED_AT
        finite = mask.masked_fill(blocked, 0.0)
        finite = finite if bool(finite.any()) else None
    t, tk = mask.shape[-2:]
    future = torch.ones(t, tk, dtype=torch.bool, device=mask.device).triu(tk - t + 1)
    causal = bool((blocked | ~future).all())
    key_mask = ~blocked.all(dim=-2).all(dim=1)  # a key no query may see is padding
    leftover = blocked & key_mask[:, None, None, :]
    if causal:
        leftover = leftover & ~future
    key_mask = None if bool(key_mask.all()) else key_mask
    if finite is None and not bool(leftover.any()):
        return causal, key_mask, None
    warnings.warn(
        "this attention mask has structure beyond causality and padding; the softmax experts apply "
        "it, the linear expert cannot",
        stacklevel=3,
    )
    bias = torch.zeros(mask.shape, device=mask.device) if finite is None else finite.float()
    return causal, key_mask, bias.masked_fill(blocked, float("-inf"))


def read_padding_mask(mask: torch.Tensor, *, true_means_blocked: bool) -> torch.Tensor:
    """A (B, T) padding mask (bool, 0/1, or additive 0/-inf) as a bool mask, True = real token."""
    if mask.dtype != torch.bool:
        if bool((mask < 0).any()):  # additive form
            return mask > BLOCKED_AT
        mask = mask != 0
    return ~mask if true_means_blocked else mask
