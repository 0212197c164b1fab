"""Mistral: LLaMA-shaped (q/k/v/o, RoPE, GQA) plus an optional sliding attention window.

The base model's `sliding_window` stays inside the full expert (`full_window`), so forced-full
routing reproduces the windowed original. Transformers then gives such a model a sliding-window KV
cache that keeps only the last `sliding_window - 1` keys; every expert still reads what it needs:
the full and local experts look no further back than that window (the local window is capped to
it), and the linear expert reads only this step's keys plus its own state.
"""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralAttention, apply_rotary_pos_emb

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter


class MaMistralConfig(MistralConfig):
    model_type = "ma_mistral"


class MetaMistralAttention(RoutedAttentionMixin, MistralAttention):
    """MistralAttention with Meta-Attention routing; projections and RoPE exactly as the original."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        out = self.routed_attention(
            hidden_states, query, key, value, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=kwargs.get("position_ids"), scaling=self.scaling,
        )
        return self.o_proj(out), None


class MaMistralModel(MetaInitMixin, MistralModel):
    config_class = MaMistralConfig


class MaMistralForCausalLM(MetaCausalLMMixin, MistralForCausalLM):
    config_class = MaMistralConfig


class MistralAdapter(ArchitectureAdapter):
    model_type = "mistral"
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    attention_class = MetaMistralAttention
    config_class = MaMistralConfig
    causal_lm_class = MaMistralForCausalLM
    original_causal_lm_class = MistralForCausalLM


MaMistralForCausalLM.adapter = MistralAdapter
MaMistralForCausalLM.inner_class = MaMistralModel
ADAPTER = MistralAdapter
