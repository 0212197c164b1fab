"""Mistral: LLaMA-shaped (q/k/v/o, RoPE, GQA) plus an optional sliding attention window.

The base model's `sliding_window` stays inside the full expert (`full_window`), so forced-full
routing reproduces the windowed original. Transformers then gives such a model a sliding-window KV
cache that keeps only the last `sliding_window - 1` keys; every expert still reads what it needs:
the full and local experts look no further back than that window (the local window is capped to
it), and the linear expert reads only this step's keys plus its own state.
"""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import MistralAttention

from ..modeling.attention import RoutedAttentionMixin
from ..modeling.base import MetaCausalLMMixin, MetaInitMixin
from .base import ArchitectureAdapter
from .llama import MetaLlamaAttention


class MaMistralConfig(MistralConfig):
    model_type = "ma_mistral"


class MetaMistralAttention(RoutedAttentionMixin, MistralAttention):
    """MistralAttention with Meta-Attention routing. Its projections and RoPE are LLaMA's, op for op,
    so it shares the LLaMA forward; the window lives in the full expert (`full_window`)."""

    forward = MetaLlamaAttention.forward


class MaMistralModel(MetaInitMixin, MistralModel):
    config_class = MaMistralConfig


class MaMistralForCausalLM(MetaCausalLMMixin, MistralForCausalLM):
    config_class = MaMistralConfig
    inner_class = MaMistralModel


class MistralAdapter(ArchitectureAdapter):
    lora_targets = r".*\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    attention_class = MetaMistralAttention
    causal_lm_class = MaMistralForCausalLM
    original_causal_lm_class = MistralForCausalLM


ADAPTER = MistralAdapter
