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
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        out = self.routed_attention(
            hidden_states, query, key, value, attention_mask=attention_mask, call_kwargs=kwargs, scaling=self.scaling
        )
        return self.o_proj(out), None


class MaLlamaModel(MetaInitMixin, LlamaModel):
    config_class = MaLlamaConfig


class MaLlamaForCausalLM(MetaCausalLMMixin, LlamaForCausalLM):
    config_class = MaLlamaConfig


class LlamaAdapter(ArchitectureAdapter):
    model_type = "llama"
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    attention_class = MetaLlamaAttention
    config_class = MaLlamaConfig
    causal_lm_class = MaLlamaForCausalLM
    original_causal_lm_class = LlamaForCausalLM


MaLlamaForCausalLM.adapter = LlamaAdapter
MaLlamaForCausalLM.inner_class = MaLlamaModel
ADAPTER = LlamaAdapter
