"""Phi 1/1.5/2: q/k/v with bias, output projection `dense`, partial RoPE, optional q/k LayerNorm."""

from __future__ import annotations

import torch
from transformers import PhiConfig, PhiForCausalLM, PhiModel
from transformers.models.phi.modeling_phi import PhiAttention, apply_rotary_pos_emb

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter


class MaPhiConfig(PhiConfig):
    model_type = "ma_phi"


class MetaPhiAttention(RoutedAttentionMixin, PhiAttention):
    """PhiAttention with Meta-Attention routing; projections, q/k LayerNorm and partial RoPE exactly as the original."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        query, key, value = self.split_heads(*(proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj)))
        if self.qk_layernorm:
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)
        # Only the first rotary_ndims of each head are rotated; the rest pass through unchanged.
        n = self.rotary_ndims
        query_rot, key_rot = apply_rotary_pos_emb(query[..., :n], key[..., :n], *position_embeddings)
        query = torch.cat((query_rot, query[..., n:]), dim=-1)
        key = torch.cat((key_rot, key[..., n:]), dim=-1)
        out = self.routed_attention(hidden_states, query, key, value, attention_mask, kwargs, scaling=self.scaling)
        return self.dense(out), None


class MaPhiModel(MetaInitMixin, PhiModel):
    config_class = MaPhiConfig


class MaPhiForCausalLM(MetaCausalLMMixin, PhiForCausalLM):
    config_class = MaPhiConfig
    inner_class = MaPhiModel


class PhiAdapter(ArchitectureAdapter):
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|dense)"
    attention_class = MetaPhiAttention
    causal_lm_class = MaPhiForCausalLM
    original_causal_lm_class = PhiForCausalLM


ADAPTER = PhiAdapter
