"""E2: causal linear (kernel) attention with an ELU+1 or a learnable Hedgehog feature map.

out_i = phi(q_i) . S_i / phi(q_i) . z_i, with S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j).
The state is accumulated per kv head (no GQA repeats) in float32, chunk by chunk: within a chunk
the quadratic form, across chunks the running state. Its hybrid with an exact window is `hybrid.py`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.features import elu_features, hedgehog_features
from ..config import MetaAttnConfig
from ..initial import InitialValues
from .base import HeadAttentionExpert, dense_positions
from .registry import register_expert

_DEN_EPS = 1e-6


def _exclusive_prefix_sum(x: torch.Tensor) -> torch.Tensor:
    """sum_{c' < c} x[:, :, c'] for every chunk c (dim 2).

    On the CPU torch.cumsum scans a middle dimension ~8x slower than a loop of whole-slice adds;
    the loop is used where autograd is not recording (it would save one copy per step).
    """
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return x.cumsum(2) - x
    out = torch.empty_like(x)
    out[:, :, 0] = 0
    for c in range(1, x.shape[2]):
        torch.add(out[:, :, c - 1], x[:, :, c - 1], out=out[:, :, c])
    return out


def chunk_slots(q_pos: torch.Tensor, chunk: int, n_chunks: int) -> tuple[torch.Tensor, int]:
    """Bucket sorted query positions (B, N) by chunk: each query's slot in an (n_chunks x m) grid,
    with m the fullest chunk's count. Positions >= n_chunks * chunk are padding and all share the
    extra slot n_chunks * m."""
    chunk_id = (q_pos // chunk).clamp_max(n_chunks)
    per_chunk = torch.zeros(q_pos.shape[0], n_chunks + 1, dtype=torch.long, device=q_pos.device)
    per_chunk.scatter_add_(1, chunk_id, torch.ones_like(chunk_id))
    first = per_chunk.cumsum(1) - per_chunk
    rank = torch.arange(q_pos.shape[1], device=q_pos.device) - first.gather(1, chunk_id)
    real = chunk_id < n_chunks
    m = int(torch.where(real, rank, 0).max()) + 1  # the one host sync: bucket width
    return torch.where(real, chunk_id * m + rank, n_chunks * m), m


class ELUFeatureMap(nn.Module):
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, parameter-free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu_features(x)


class HedgehogFeatureMap(InitialValues, nn.Module):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] with a learnable W_h per head (Zhang et al., 2024).

    Softmax features are positive and spiky like softmax attention itself; W_h starts at the identity.
    """

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim, head_dim))
        self.reset_parameters()

    def initial_values(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.eye(self.weight.shape[-1]).expand_as(self.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, d)
        return hedgehog_features(x, self.weight)


def feature_weight(feature_map: nn.Module) -> Optional[torch.Tensor]:
    """The learnable weight of a Hedgehog map, None for ELU+1 (what the kernels take)."""
    return feature_map.weight if isinstance(feature_map, HedgehogFeatureMap) else None


@register_expert("linear")
class LinearAttention(HeadAttentionExpert):
    """Causal kernel attention: O(T) state, cost 0.15. Ignores additive biases (uses key_mask only)."""

    _cost = 0.15
    chunk = 64

    recurrent = True  # summarises the keys before a call in a state (S, z) instead of reading them

    def __init__(self, cfg: MetaAttnConfig) -> None:
        super().__init__()
        if cfg.feature_map == "hedgehog":
            self.q_map: nn.Module = HedgehogFeatureMap(cfg.n_heads, cfg.d_head)
            self.k_map: nn.Module = HedgehogFeatureMap(cfg.kv_heads, cfg.d_head)
        else:
            self.q_map = self.k_map = ELUFeatureMap()

    def query_features(self, q, n_kv_heads):
        """float32 phi(q) as (B, Hkv, G, N, F)."""
        b, hq, n, _ = q.shape
        return self.q_map(q.float()).view(b, n_kv_heads, hq // n_kv_heads, n, -1)

    def key_features(self, k, key_mask):
        """float32 phi(k) as (B, Hkv, Tk, F), zero at masked keys."""
        phi_k = self.k_map(k.float())
        return phi_k if key_mask is None else phi_k * key_mask[:, None, :, None].to(phi_k.dtype)

    def read_state(self, phi_q, state):
        """phi(q) . S and phi(q) . z: the numerator and denominator over the keys a state (S, z) holds."""
        return torch.einsum("bhgnf,bhfd->bhgnd", phi_q, state[0]), torch.einsum("bhgnf,bhf->bhgn", phi_q, state[1])

    def attend(self, q, k, v, q_pos=None, *, scale=None, causal=True, key_mask=None, attn_bias=None, state=None):
        """As `HeadAttentionExpert.attend`; `state` = (S, z) summarises the keys before `k` (a cache)."""
        b, hq, n, d = q.shape
        phi_q = self.query_features(q, k.shape[1])
        if causal:
            if q_pos is None and n != k.shape[2]:
                q_pos = dense_positions(n, k.shape[2], b, q.device)
            out = self._causal(phi_q, self.key_features(k, key_mask), v.float(), q_pos, state)
        elif state is not None:
            raise ValueError("a linear-attention state only continues causal attention")
        else:
            num, den = self.read_state(phi_q, self.advance_state(k, v, key_mask))
            out = num / den.clamp_min(_DEN_EPS).unsqueeze(-1)
        return out.reshape(b, hq, n, d).to(q.dtype)

    def advance_state(self, k, v, key_mask=None, state=None):
        """The state after keys k, v (B, Hkv, T, d): S = S0 + sum phi(k) v^T, z = z0 + sum phi(k)."""
        phi_k = self.key_features(k, key_mask)
        s = torch.einsum("bhtf,bhtd->bhfd", phi_k, v.float())
        z = phi_k.sum(2)
        return (s, z) if state is None else (state[0] + s, state[1] + z)

    def _chunk_states(self, phi_k, v, state=None):
        """Exclusive prefix states at chunk starts, (B, Hkv, nC, F, d + 1): S with z as its last
        column (v carries a channel of ones), continuing `state` (the keys before these) when given."""
        c = self.chunk
        pad = -phi_k.shape[2] % c
        phi_k = F.pad(phi_k, (0, 0, 0, pad))
        v = F.pad(v, (0, 1, 0, pad), value=1.0)  # the ones channel: the denominator rides along
        b, h, t, f = phi_k.shape
        kc = phi_k.view(b, h, t // c, c, f)
        vc = v.view(b, h, t // c, c, -1)
        s = _exclusive_prefix_sum(torch.einsum("bhncf,bhncd->bhnfd", kc, vc))
        if state is not None:
            s = s + torch.cat([state[0], state[1].unsqueeze(-1)], -1).unsqueeze(2)
        return kc, vc, s

    def _causal(self, phi_q, phi_k, v, q_pos, state=None, normalise=True):
        """Causal outputs for queries at key indices `q_pos` (None: every key is a query); with
        `normalise` False, the numerator with the denominator as one more channel.

        Queries are bucketed by the chunk they fall in, m slots per chunk (m = the fullest chunk's
        count, C when every key is a query). Each bucket reads its chunk's prefix state and the
        chunk's own keys up to each query's position, all chunks at once: work scales with the
        number of queries, not with T.
        """
        c = self.chunk
        kc, vc, s = self._chunk_states(phi_k, v, state)  # vc, s: the denominator as the last channel
        b, h, g, n, f = phi_q.shape
        n_chunks = kc.shape[2]
        if q_pos is None:
            m, slot, order = c, None, None
            buckets = F.pad(phi_q, (0, 0, 0, n_chunks * c - n))
            pos = torch.arange(n_chunks * c, device=phi_q.device).expand(1, -1)
        else:
            q_pos, order = torch.where(q_pos >= 0, q_pos, n_chunks * c).sort(dim=1)  # padding slots last
            phi_q = phi_q.gather(3, order[:, None, None, :, None].expand_as(phi_q))
            slot, m = chunk_slots(q_pos, c, n_chunks)
            buckets = phi_q.new_zeros(b, h, g, n_chunks * m + 1, f)
            buckets.scatter_(3, slot[:, None, None, :, None].expand_as(phi_q), phi_q)
            buckets = buckets[:, :, :, : n_chunks * m]
            pos = torch.full((b, n_chunks * m + 1), -1, dtype=q_pos.dtype, device=q_pos.device)
            pos = pos.scatter_(1, slot, q_pos)[:, : n_chunks * m]  # padding slots keep -1: no keys
        buckets = buckets.view(b, h, g, n_chunks, m, f)
        key_pos = torch.arange(n_chunks * c, device=phi_q.device).view(n_chunks, 1, c)
        visible = (key_pos <= pos.view(-1, n_chunks, m, 1)).to(buckets.dtype)  # (B|1, nC, m, C)
        scores = torch.einsum("bhgnmf,bhncf->bhgnmc", buckets, kc) * visible[:, None, None]
        out = torch.einsum("bhgnmf,bhnfd->bhgnmd", buckets, s) + torch.einsum("bhgnmc,bhncd->bhgnmd", scores, vc)
        if normalise:
            out = out[..., :-1] / out[..., -1:].clamp_min(_DEN_EPS)
        out = out.flatten(3, 4)
        if slot is None:
            return out[:, :, :, :n]
        out = F.pad(out, (0, 0, 0, 1))  # the padding slot's output: zeros
        out = out.gather(3, slot[:, None, None, :, None].expand(b, h, g, n, out.shape[-1]))
        return torch.empty_like(out).scatter_(3, order[:, None, None, :, None].expand_as(out), out)
