"""`convert`: turn a loaded Hugging Face causal LM into its Meta-Attention version, in place."""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .adapters import adapter_for
from .core.config import MetaAttnConfig
from .modeling.base import install_meta_attention, meta_attention_block


def convert(model: nn.Module, cfg: Optional[MetaAttnConfig] = None, **overrides: Any) -> nn.Module:
    """Convert `model` in place and return it.

    Every attention layer becomes Meta-Attention; the original parameters keep their names and
    tensors, so with ``force_expert(model, "full")`` the model computes exactly what it did.
    `cfg` and `overrides` set the experts and the router; heads, head_dim and positions come from
    the model's config (a contradicting value is an error).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model).__name__}")
    if config.model_type.startswith("ma_"):
        raise ValueError(f"this model is already converted ({config.model_type})")
    adapter = adapter_for(config.model_type)
    if not isinstance(model, adapter.original_causal_lm_class):
        raise TypeError(
            f"convert expects a {adapter.original_causal_lm_class.__name__}, got {type(model).__name__}"
        )
    meta_cfg = adapter.meta_config(config, cfg, **overrides)
    values = config.to_dict()
    values.pop("model_type", None)
    values["meta_attention"] = meta_attention_block(
        meta_cfg,
        base_model=getattr(config, "_name_or_path", None) or None,
        base_revision=getattr(config, "_commit_hash", None),
        base_type=config.model_type,
    )
    new_config = adapter.config_class.from_dict(values)
    new_config._attn_implementation = config._attn_implementation
    model.config = new_config
    install_meta_attention(model, meta_cfg, adapter, adapter.causal_lm_class.inner_class)
    model.__class__ = adapter.causal_lm_class
    getattr(model, adapter.inner_attribute).config = new_config
    for module in model.modules():
        if hasattr(module, "config") and module.config is config:
            module.config = new_config
    return model
