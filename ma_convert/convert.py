"""`convert`: turn a loaded Hugging Face causal LM into its Meta-Attention version, in place."""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .adapters import adapter_for
from .core.config import MetaAttnConfig
from .modeling.base import install_meta_attention, meta_attention_block


def convert_config(config: Any, cfg: Optional[MetaAttnConfig] = None, **overrides: Any):
    """The converted (``Ma<Arch>Config``) twin of an original model config.

    Validates `cfg`/`overrides` against the model before any weight is touched: an unsupported
    architecture or a contradicting shape raises here.
    """
    if config.model_type.startswith("ma_"):
        raise ValueError(f"this model is already converted ({config.model_type})")
    adapter = adapter_for(config.model_type)
    meta_cfg = adapter.meta_config(config, cfg, **overrides)
    values = config.to_dict()
    values.pop("model_type", None)
    values.pop("auto_map", None)
    values["meta_attention"] = meta_attention_block(
        meta_cfg,
        base_model=getattr(config, "_name_or_path", None) or None,
        base_revision=getattr(config, "_commit_hash", None),
        base_type=config.model_type,
    )
    new_config = adapter.config_class.from_dict(values)
    new_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return new_config


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
    new_config = convert_config(config, cfg, **overrides)
    adapter = adapter_for(config.model_type)
    if not isinstance(model, adapter.original_causal_lm_class):
        raise TypeError(f"convert expects a {adapter.original_causal_lm_class.__name__}, got {type(model).__name__}")
    install_meta_attention(model, adapter.meta_config(config, cfg, **overrides), adapter, adapter.causal_lm_class.inner_class)
    model.__class__ = adapter.causal_lm_class
    for module in model.modules():  # every submodule holding the old config object gets the new one
        if getattr(module, "config", None) is config:
            module.config = new_config
    return model
