"""`MetaAttentionLayer`: the standalone (B, T, D) Meta-Attention layer, with its own projections."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MetaAttnConfig
from .experts.base import AttentionExpert, HeadAttentionExpert
from .masks import read_attention_mask, read_padding_mask
from .meta_attention import MetaAttention
from .policy import RoutingPolicy
from .stats import RoutingStats


def split_mask(
    mask: Optional[torch.Tensor], batch: int, length: int
) -> tuple[bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Read the layer's `mask` argument as (causal, key_mask (B, T) bool, attn_bias).

    - (B, T): padding mask, true/1 = real token (or additive 0 / -inf).
    - (B, T, T) or (B|1, H|1, T, T): attention mask, bool (True = may attend) or additive float.
    """
    if mask is None:
        return False, None, None
    if mask.dim() == 2:
        if mask.shape != (batch, length):
            raise ValueError(f"a 2-D mask is a (batch, seq) padding mask of shape {(batch, length)}, got {tuple(mask.shape)}")
        return False, read_padding_mask(mask, true_means_blocked=False), None
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[-2:] != (length, length):
        raise ValueError(
            f"mask must be a (B, T) padding mask or a (B, [H,] T, T) attention mask with T={length}, "
            f"got shape {tuple(mask.shape)}"
        )
    causal, key_mask, bias = read_attention_mask(mask, true_means_blocked=False)
    return causal, None if key_mask is None else key_mask.expand(batch, length), bias


class MetaAttentionLayer(nn.Module):
    """Drop-in attention sub-layer: ``out, aux_loss, stats = layer(x, mask=None)``.

    Q/K/V/O projections are computed once and shared by the built-in experts; custom experts
    (:class:`AttentionExpert` subclasses with ``forward(x, mask)``) map hidden states to hidden
    states themselves and always see the whole sequence.

    Causal by default; ``causal=False`` makes every expert bidirectional (the hybrid expert,
    ``linear_window > 0``, is causal only). `policy`: how it routes (default: a soft `RoutingPolicy`).
    """

    def __init__(
        self, cfg: MetaAttnConfig, experts: Optional[Sequence[AttentionExpert]] = None, bias: bool = True,
        policy: Optional[RoutingPolicy] = None, causal: bool = True,
    ) -> None:
        super().__init__()
        if not causal and cfg.linear_window:
            raise ValueError(f"MetaAttnConfig.linear_window={cfg.linear_window} is invalid for a bidirectional "
                             "layer (causal=False): the hybrid expert is causal only; use 0")
        self.cfg, self.causal = cfg, causal
        hq, hkv, dh = cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, hq * dh, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, hkv * dh, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, hkv * dh, bias=bias)
        self.o_proj = nn.Linear(hq * dh, cfg.d_model, bias=bias)
        self.meta = MetaAttention(cfg, experts, policy)

    @property
    def experts(self) -> nn.ModuleList:
        return self.meta.experts

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        """x: (B, T, D). Returns the output (B, T, D), the auxiliary loss and the `RoutingStats`."""
        cfg = self.cfg
        b, t, _ = x.shape
        mask_is_causal, key_mask, attn_bias = split_mask(mask, b, t)
        q = self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.kv_heads, cfg.d_head).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.kv_heads, cfg.d_head).transpose(1, 2)
        heads, weights = self.meta(
            x,
            q,
            k,
            v,
            positions=positions,
            causal=self.causal or mask_is_causal,
            key_mask=key_mask,
            attn_bias=attn_bias,
            query_valid=key_mask,
        )
        heads = heads.transpose(1, 2).reshape(b, t, -1)
        custom = [i for i, e in enumerate(self.experts) if not isinstance(e, HeadAttentionExpert)]
        if not custom:  # routing weights sum to one, so the mix of o_proj(expert) is o_proj(mix)
            return self.o_proj(heads), self.meta.last_aux_loss, self.meta.last_stats
        out = F.linear(heads, self.o_proj.weight)
        if self.o_proj.bias is not None:
            # Each built-in expert's output is o_proj(its heads), bias included, weighted by its route.
            head_weight = 1.0 - sum(weights[..., i] for i in custom)
            out = out + head_weight.unsqueeze(-1).to(out.dtype) * self.o_proj.bias
        for i in custom:
            w = weights[..., i : i + 1]
            if self.training or bool(w.any()):
                out = out + w.to(out.dtype) * self.experts[i](x, mask)
        return out, self.meta.last_aux_loss, self.meta.last_stats
