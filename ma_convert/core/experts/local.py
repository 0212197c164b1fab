"""E3: sliding-window softmax attention, with optional attention-sink tokens."""

from __future__ import annotations

from ..config import MetaAttnConfig
from .base import HeadAttentionExpert, blocked_softmax_attention, dense_positions
from .registry import register_expert


@register_expert("local")
class LocalAttention(HeadAttentionExpert):
    """Each query sees its last `window_size` keys (itself included) and the first `sink_tokens`.

    Bidirectional (``causal=False``): keys within `window_size` on either side. Cost 0.30.
    """

    _cost = 0.30

    def __init__(self, cfg: MetaAttnConfig) -> None:
        super().__init__()
        self.window = cfg.window_size
        self.sinks = cfg.sink_tokens
        self.dropout = cfg.dropout

    def attend(self, q, k, v, q_pos=None, *, scale=None, causal=True, key_mask=None, attn_bias=None):
        dense = q_pos is None
        if dense:
            q_pos = dense_positions(q.shape[2], k.shape[2], q.shape[0], q.device)
        return blocked_softmax_attention(
            q, k, v, q_pos, causal=causal, scale=scale, window=self.window, sinks=self.sinks, key_mask=key_mask,
            attn_bias=attn_bias, dropout_p=self.dropout if self.training else 0.0,
            # On the CPU small query blocks keep each block's key span close to the window (FLOPs
            # dominate); on a GPU, launches do: 64-query blocks made a SmolLM2 training step
            # launch-bound (960 attention calls, 10x the GPU's own time), so blocks are large there.
            # Gathered (routed) queries keep small blocks everywhere: a block spans its first to last position.
            block=1024 if dense and q.device.type != "cpu" else 64,
            dense=dense,
        )

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks}"
