"""Phi-3: one fused `qkv_proj` (split into q, k, v as the original does), `o_proj`, GQA, RoPE that
may rotate only part of each head, and an optional sliding attention window (kept by the full
expert, as for Mistral)."""

from __future__ import annotations

from transformers import Phi3Config, Phi3ForCausalLM, Phi3Model
from transformers.models.phi3.modeling_phi3 import Phi3Attention, apply_rotary_pos_emb

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter


class MaPhi3Config(Phi3Config):
    model_type = "ma_phi3"


class MetaPhi3Attention(RoutedAttentionMixin, Phi3Attention):
    """Phi3Attention with Meta-Attention routing; projections and RoPE exactly as the original."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        # The fused output is [q heads | k heads | v heads].
        kv_size = self.num_key_value_heads * self.head_dim
        sizes = [self.config.num_attention_heads * self.head_dim, kv_size, kv_size]
        query, key, value = self.split_heads(*self.qkv_proj(hidden_states).split(sizes, dim=-1))
        # Rotates the first cos.shape[-1] dims of each head (partial rotary) and passes the rest.
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        out = self.routed_attention(hidden_states, query, key, value, attention_mask, kwargs, scaling=self.scaling)
        return self.o_proj(out), None


class MaPhi3Model(MetaInitMixin, Phi3Model):
    config_class = MaPhi3Config


class MaPhi3ForCausalLM(MetaCausalLMMixin, Phi3ForCausalLM):
    config_class = MaPhi3Config
    inner_class = MaPhi3Model


class Phi3Adapter(ArchitectureAdapter):
    lora_targets = r".*\.self_attn\.(qkv_proj|o_proj)"
    attention_class = MetaPhi3Attention
    causal_lm_class = MaPhi3ForCausalLM
    original_causal_lm_class = Phi3ForCausalLM


ADAPTER = Phi3Adapter
