"""Falcon: fused `query_key_value`, output `dense`; multi-query (7B), grouped kv (40B, new decoder
architecture) or full multi-head; RoPE, or ALiBi (RW models)."""

from __future__ import annotations

import math

from transformers import FalconConfig, FalconForCausalLM, FalconModel
from transformers.models.falcon.modeling_falcon import FalconAttention, apply_rotary_pos_emb

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter


class MaFalconConfig(FalconConfig):
    model_type = "ma_falcon"


class MetaFalconAttention(RoutedAttentionMixin, FalconAttention):
    """FalconAttention with Meta-Attention routing; fused qkv split, RoPE and ALiBi exactly as the original.

    The original broadcasts each kv group's key/value to all its query heads (new decoder
    architecture) and caches the copies; here each group keeps one key/value head, which is the same
    attention (query head h reads kv head h // group size) with a cache group-size times smaller.
    """

    def _split_qkv(self, fused_qkv):
        """query (B, T, Hq, d), key/value (B, T, Hkv, d) from the fused projection."""
        if not self.new_decoder_architecture:
            return self._split_heads(fused_qkv)  # multi-query: Hkv = 1; multi-head: Hkv = Hq
        batch, seq_len, _ = fused_qkv.shape
        # Laid out per kv group: the group's query heads, then its key head, then its value head.
        qkv = fused_qkv.view(batch, seq_len, -1, self.num_heads // self.num_kv_heads + 2, self.head_dim)
        return qkv[:, :, :, :-2].flatten(2, 3), qkv[:, :, :, -2], qkv[:, :, :, -1]

    def forward(self, hidden_states, alibi, attention_mask, position_embeddings=None, **kwargs):
        query, key, value = (x.transpose(1, 2) for x in self._split_qkv(self.query_key_value(hidden_states)))
        bias = None
        if alibi is None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        else:
            # The original SDPA path adds ALiBi / sqrt(head_dim) through the mask the model folds it
            # into (FalconModel.forward); the same op here, as a bias the softmax experts add.
            bias = alibi.view(hidden_states.shape[0], self.num_heads, 1, -1) / math.sqrt(self.head_dim)
        out = self.routed_attention(hidden_states, query, key, value, attention_mask, kwargs,
                                    scaling=self.inv_norm_factor, attn_bias=bias)
        return self.dense(out), None


class MaFalconModel(MetaInitMixin, FalconModel):
    config_class = MaFalconConfig


class MaFalconForCausalLM(MetaCausalLMMixin, FalconForCausalLM):
    config_class = MaFalconConfig
    inner_class = MaFalconModel


class FalconAdapter(ArchitectureAdapter):
    lora_targets = r".*\.self_attention\.(query_key_value|dense)"
    attention_class = MetaFalconAttention
    causal_lm_class = MaFalconForCausalLM
    original_causal_lm_class = FalconForCausalLM

    @classmethod
    def attention_modules(cls, model):
        return [layer.self_attention for layer in model.transformer.h]

    @classmethod
    def derived_fields(cls, config):
        # The distinct kv heads of the fused qkv layout: grouped, one (multi-query) or one per head.
        if config.new_decoder_architecture:
            kv_heads = config.num_kv_heads
        else:
            kv_heads = 1 if config.multi_query else config.num_attention_heads
        return {**super().derived_fields(config), "n_kv_heads": kv_heads}


ADAPTER = FalconAdapter
