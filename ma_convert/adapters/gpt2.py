"""GPT-2: fused Conv1D c_attn/c_proj, learned absolute positions, the decoder stack at `transformer.h`."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter


class MaGPT2Config(GPT2Config):
    model_type = "ma_gpt2"


class MetaGPT2Attention(RoutedAttentionMixin, GPT2Attention):
    """GPT2Attention (self-attention only) with Meta-Attention routing; projections exactly as the original.

    `self.scaling` already folds in `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`.
    `reorder_and_upcast_attn` only changes the original's eager path to compute the scores in fp32
    (scaled inside baddbmm): the same scale, so in fp32 the full expert matches it.
    """

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        query, key, value = self.split_heads(*self.c_attn(hidden_states).split(self.split_size, dim=2))
        out = self.routed_attention(hidden_states, query, key, value, attention_mask, kwargs, scaling=self.scaling)
        return self.resid_dropout(self.c_proj(out)), None


class MaGPT2Model(MetaInitMixin, GPT2Model):
    config_class = MaGPT2Config


class MaGPT2LMHeadModel(MetaCausalLMMixin, GPT2LMHeadModel):
    config_class = MaGPT2Config
    inner_class = MaGPT2Model


class GPT2Adapter(ArchitectureAdapter):
    lora_targets = r".*\.attn\.(c_attn|c_proj)"
    attention_class = MetaGPT2Attention
    causal_lm_class = MaGPT2LMHeadModel
    original_causal_lm_class = GPT2LMHeadModel

    @classmethod
    def attention_modules(cls, model):
        # Self-attention only: the cross-attention of add_cross_attention models stays the original.
        return [block.attn for block in model.transformer.h]


ADAPTER = GPT2Adapter
