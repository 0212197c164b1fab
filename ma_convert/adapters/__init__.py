"""One adapter per supported architecture, each in its own module, imported on first use, except by
`register_auto_classes`, which `import ma_convert` calls so that transformers' Auto classes load
converted folders."""

from __future__ import annotations

import importlib
import importlib.util

# original model_type -> module of its adapter
ADAPTER_MODULES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "mistral",
    "phi": "phi",
    "phi3": "phi3",
    "falcon": "falcon",
}


def supported_architectures() -> list[str]:
    """The model_types this installation converts."""
    return sorted(t for t, m in ADAPTER_MODULES.items() if importlib.util.find_spec(f"{__name__}.{m}") is not None)


def adapter_for(model_type: str):
    """The adapter class for a Hugging Face `model_type` (the original's, or the converted `ma_*`)."""
    base = model_type[3:] if model_type.startswith("ma_") else model_type
    if base not in supported_architectures():
        raise ValueError(
            f"architecture {model_type!r} is not supported; ma_convert converts: {', '.join(supported_architectures())}"
        )
    module = importlib.import_module(f".{ADAPTER_MODULES[base]}", __name__)
    return module.ADAPTER


def register_auto_classes() -> None:
    """After this, AutoConfig / AutoModelForCausalLM load `ma_*` folders without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_type in supported_architectures():
        adapter = adapter_for(model_type)
        AutoConfig.register(adapter.config_class.model_type, adapter.config_class, exist_ok=True)
        AutoModelForCausalLM.register(adapter.config_class, adapter.causal_lm_class, exist_ok=True)
