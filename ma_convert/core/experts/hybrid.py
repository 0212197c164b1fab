"""E2, hybrid form (LoLCATs' sliding window + linear attention): exact where it matters, linear beyond.

Query i weighs the last W keys (itself included) and the first S keys (sinks) by exp(q_i . k_j *
scale), and the keys in between by exp(a_h) phi(q_i) . phi(k_j), all normalised together; a_h is
a learnable per-head log-weight. Measured on SmolLM2-135M: relative MSE to full attention 0.108
with W=64, against 0.395 for pure kernel attention (benchmarks/results/expert_fidelity_*.md).

Decoding is O(W) per token: the kernel part reads a state over keys S .. i-W, which lags the KV
cache by W keys, and the exact part reads the window and the sinks from the cache.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MetaAttnConfig
from ..initial import InitialValues
from .base import dense_positions
from .linear import _DEN_EPS, LinearAttention
from .registry import register_expert


@register_expert("hybrid")
class HybridAttention(InitialValues, LinearAttention):
    """Exact softmax over the last `window` keys and the `sinks` first keys, kernel attention over
    the keys between, one normalisation. Cost 0.15 (its window is small: 64 keys by default)."""

    _cost = 0.15
    recurrent = False  # it reads the KV cache; its state is the kernel part's, lagging the cache
    query_chunk = 2048  # queries per pass of the exact part, bounding its gathered keys' memory

    def __init__(self, cfg: MetaAttnConfig) -> None:
        super().__init__(cfg)
        self.window = cfg.linear_window or 64
        self.sinks = cfg.sink_tokens
        self.log_weight = nn.Parameter(torch.empty(cfg.n_heads))
        self.reset_parameters()

    def initial_values(self) -> dict[str, torch.Tensor]:
        return {"log_weight": torch.zeros_like(self.log_weight)}

    @property
    def state_start(self) -> int:
        return self.sinks  # the sinks are always exact: the kernel part starts after them

    def state_end(self, position: int) -> int:
        """Exclusive end of the keys a query at key index `position` reads through the state."""
        return max(position - self.window + 1, self.sinks)

    def attend(self, q, k, v, q_pos=None, *, scale=None, causal=True, key_mask=None, attn_bias=None, state=None):
        """As `HeadAttentionExpert.attend`, over every key. With `state` (S, z) over keys sinks .. Tk-1-W,
        the one query of each row is the last key (decoding): only the window and the sinks are read.
        Without, kernel attention runs once over the keys before the windows, and the exact part over
        the sinks and the window, gathered per query, a chunk of queries at a time."""
        if not causal:
            raise ValueError("the hybrid expert attends causally")
        b, hq, n, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        scale = d**-0.5 if scale is None else scale
        qf = q.float().view(b, hkv, hq // hkv, n, d)
        phi_q = self.query_features(q, hkv)
        if state is not None:
            position = torch.full((b, n), tk - 1, device=q.device)
            num, den, top = self._window_part(qf, k, v, position, scale, key_mask)
            return self._merge(num, den, top, *self.read_state(phi_q, state)).reshape(b, hq, n, d).to(q.dtype)
        if q_pos is None:
            q_pos = dense_positions(n, tk, b, q.device)
        phi_k = self.key_features(k, key_mask)
        phi_k = phi_k * (torch.arange(tk, device=k.device) >= self.sinks)[:, None].to(phi_k.dtype)  # sinks are exact
        # Keys sinks .. p-W: causal kernel attention for a query sitting W keys earlier.
        lin = self._causal(phi_q, phi_k, v.float(), torch.where(q_pos >= 0, q_pos - self.window, -1), normalise=False)
        out = []
        for i in range(0, n, self.query_chunk):
            rows = slice(i, i + self.query_chunk)
            num, den, top = self._window_part(qf[:, :, :, rows], k, v, q_pos[:, rows], scale, key_mask)
            out.append(self._merge(num, den, top, lin[:, :, :, rows, :-1], lin[:, :, :, rows, -1]))
        return torch.cat(out, dim=3).reshape(b, hq, n, d).to(q.dtype)

    def _merge(self, num, den, top, lin_num, lin_den):
        """(exact numerator + exp(a_h) kernel numerator) / (the same for the denominators), on the
        exact part's scale exp(-top)."""
        hkv, g = num.shape[1], num.shape[2]
        far = torch.exp(self.log_weight.float().view(1, hkv, g, 1) - top)
        return (num + far[..., None] * lin_num) / (den + far * lin_den).clamp_min(_DEN_EPS).unsqueeze(-1)

    def _window_part(self, q, k, v, q_pos, scale, key_mask):
        """Unnormalised exact attention of queries (B, Hkv, G, N, d) at q_pos over the sinks and their
        last `window` keys: numerator, denominator and the score maximum they are scaled by."""
        b, hkv, _, n, d = q.shape
        tk, w, s = k.shape[2], self.window, self.sinks
        pos = q_pos[..., None]
        window = pos - w + 1 + torch.arange(w, device=q.device)
        idx = torch.cat([torch.arange(s, device=q.device).expand(b, n, s), window], -1)
        valid = (idx >= 0) & (idx <= pos) & (pos >= 0)
        valid[..., :s] &= idx[..., :s] <= pos - w  # a sink inside the window counts once
        idx = idx.clamp(0, tk - 1)
        if key_mask is not None:
            valid &= key_mask.gather(1, idx.flatten(1)).view_as(idx).bool()
        flat = idx.flatten(1)[:, None, :, None].expand(b, hkv, n * (s + w), d)
        keys = k.float().gather(2, flat).view(b, hkv, n, s + w, d)
        values = v.float().gather(2, flat).view(b, hkv, n, s + w, d)
        scores = torch.einsum("bhgnd,bhnkd->bhgnk", q, keys) * scale
        scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
        top = scores.amax(-1)
        top = torch.where(torch.isfinite(top), top, 0.0)  # a query with no exact key (padding)
        weights = torch.exp(scores - top[..., None])
        return torch.einsum("bhgnk,bhnkd->bhgnd", weights, values), weights.sum(-1), top

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks}"
