"""LLaMA (and LLaMA-shaped models such as SmolLM2): q/k/v/o projections, RoPE, GQA."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter


class MaLlamaConfig(LlamaConfig):
    model_type = "ma_llama"


class MetaLlamaAttention(RoutedAttentionMixin, LlamaAttention):
    """LlamaAttention with Meta-Attention routing; projections and RoPE exactly as the original."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        query, key, value = self.split_heads(*(proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj)))
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        out = self.routed_attention(hidden_states, query, key, value, attention_mask, kwargs, scaling=self.scaling)
        return self.o_proj(out), None


class MaLlamaModel(MetaInitMixin, LlamaModel):
    config_class = MaLlamaConfig


class MaLlamaForCausalLM(MetaCausalLMMixin, LlamaForCausalLM):
    config_class = MaLlamaConfig
    inner_class = MaLlamaModel


class LlamaAdapter(ArchitectureAdapter):
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    attention_class = MetaLlamaAttention
    causal_lm_class = MaLlamaForCausalLM
    original_causal_lm_class = LlamaForCausalLM


ADAPTER = LlamaAdapter
