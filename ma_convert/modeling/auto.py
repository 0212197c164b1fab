"""Registration of every converted architecture with transformers' Auto classes."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import adapter_for, supported_architectures


def register_auto_classes() -> None:
    """After this, AutoConfig / AutoModelForCausalLM load `ma_*` folders without remote code."""
    for model_type in supported_architectures():
        adapter = adapter_for(model_type)
        AutoConfig.register(adapter.config_class.model_type, adapter.config_class, exist_ok=True)
        AutoModelForCausalLM.register(adapter.config_class, adapter.causal_lm_class, exist_ok=True)
