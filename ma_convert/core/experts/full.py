"""E1: full causal softmax attention, exactly the original model's attention."""

from __future__ import annotations

import torch.nn.functional as F

from ..config import MetaAttnConfig
from .base import HeadAttentionExpert, blocked_softmax_attention, dense_positions
from .registry import register_expert


@register_expert("full")
class FullAttention(HeadAttentionExpert):
    """Softmax attention over every visible key, through SDPA. Cost 1.0."""

    _cost = 1.0

    def __init__(self, cfg: MetaAttnConfig) -> None:
        super().__init__()
        self.dropout = cfg.dropout
        self.window = cfg.full_window  # the base model's own window (Mistral); None: every key

    def attend(self, q, k, v, q_pos=None, *, scale=None, causal=True, key_mask=None, attn_bias=None):
        n, tk = q.shape[2], k.shape[2]
        p = self.dropout if self.training else 0.0
        gqa = q.shape[1] != k.shape[1]
        plain = q_pos is None and key_mask is None and attn_bias is None and (self.window is None or tk <= self.window)
        if plain and (not causal or n in (tk, 1)):
            # The plain case (prefill or one decode step) takes SDPA's own causal kernel.
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=causal and n > 1, scale=scale, enable_gqa=gqa
            )
        if q_pos is None:
            q_pos = dense_positions(n, tk, q.shape[0], q.device)
        return blocked_softmax_attention(
            q, k, v, q_pos, causal=causal, scale=scale, window=self.window, key_mask=key_mask, attn_bias=attn_bias,
            dropout_p=p,
        )
