"""One adapter per supported architecture, each in its own module, imported on first use, except by
`register_auto_classes`, which `import ma_convert` calls so that transformers' Auto classes load
converted folders."""

from __future__ import annotations

import importlib

# The original model_types converted, each by the module of that name here.
ARCHITECTURES = ("falcon", "gpt2", "llama", "mistral", "phi", "phi3")


def adapter_for(model_type: str):
    """The adapter class for a Hugging Face `model_type` (the original's, or the converted `ma_*`)."""
    base = model_type.removeprefix("ma_")
    if base not in ARCHITECTURES:
        raise ValueError(
            f"architecture {model_type!r} is not supported; ma_convert converts: {', '.join(ARCHITECTURES)}"
        )
    return importlib.import_module(f".{base}", __name__).ADAPTER


def register_auto_classes() -> None:
    """After this, AutoConfig / AutoModelForCausalLM load `ma_*` folders without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type in ARCHITECTURES:
        adapter = adapter_for(model_type)
        AutoConfig.register(adapter.config_class.model_type, adapter.config_class, exist_ok=True)
        AutoModelForCausalLM.register(adapter.config_class, adapter.causal_lm_class, exist_ok=True)
