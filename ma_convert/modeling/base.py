"""What every converted architecture shares: the config block, weight initialisation, conversion.

A converted model is the original model class with three changes, made in place so that every
original parameter keeps its name and its tensor:

- the config becomes ``Ma<Arch>Config`` (``model_type`` ``ma_<arch>``) with a ``meta_attention``
  block: format version, converter version, base model, and the `MetaAttnConfig`;
- each attention module becomes the architecture's routed subclass, with a ``meta`` submodule
  (router + experts);
- the inner model becomes a subclass whose ``_init_weights`` knows the new parameters:
  transformers initialises missing weights with the *inner* model's ``_init_weights``, and
  parameters it does not know would load as uninitialised memory.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn

from ..core.config import FORMAT_VERSION, MetaAttnConfig
from ..core.controller import DirichletRouter, SoftmaxRouter
from ..core.experts.linear import HedgehogFeatureMap
from ..core.meta_attention import MetaAttention

# The format of the config's `meta_attention` block (the MetaAttnConfig inside has its own).
BLOCK_FORMAT_VERSION = 1
CONVERTER_VERSION = "0.1.0"  # kept in step with ma_convert.version by a test


def meta_attention_block(cfg: MetaAttnConfig, base_model: Optional[str], base_revision: Optional[str], base_type: str) -> dict:
    return {
        "format_version": BLOCK_FORMAT_VERSION,
        "converter_version": CONVERTER_VERSION,
        "base_model": base_model,
        "base_model_revision": base_revision,
        "base_model_type": base_type,
        "attention": cfg.to_dict(),
    }


def read_meta_attention_block(config) -> MetaAttnConfig:
    """The MetaAttnConfig of a converted model's config, checked for a format we can read."""
    block = getattr(config, "meta_attention", None)
    if not isinstance(block, dict) or "attention" not in block:
        raise ValueError(
            f"{type(config).__name__} has no valid `meta_attention` block; it was not written by ma_convert"
        )
    version = block.get("format_version")
    if not isinstance(version, int) or version > BLOCK_FORMAT_VERSION:
        raise ValueError(
            f"this checkpoint's meta_attention format_version={version!r} is newer than this ma_convert "
            f"understands ({BLOCK_FORMAT_VERSION}, MetaAttnConfig {FORMAT_VERSION}); upgrade ma-convert"
        )
    return MetaAttnConfig.from_dict(block["attention"])


def init_meta_weights(module: nn.Module) -> bool:
    """Initialise a Meta-Attention module the way its constructor does; False if it is not one."""
    if isinstance(module, (DirichletRouter, SoftmaxRouter)):
        for child in (module.norm, module.fc1):
            child.reset_parameters()
        module.reset_parameters() if isinstance(module, DirichletRouter) else module.reset_output(
            torch.zeros(module.fc2.out_features)
        )
        return True
    if isinstance(module, HedgehogFeatureMap):
        module.reset_parameters()
        return True
    return False


class MetaInitMixin:
    """`_init_weights` that also initialises routers and expert parameters."""

    def _init_weights(self, module: nn.Module) -> None:
        if not init_meta_weights(module):
            super()._init_weights(module)


class MetaCausalLMMixin(MetaInitMixin):
    """Builds the routed attention modules of a converted causal LM on construction.

    Subclasses set ``adapter`` (the architecture adapter) and ``inner_class`` (the Ma inner model).
    """

    adapter: ClassVar[Any]
    inner_class: ClassVar[type]

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        install_meta_attention(self, read_meta_attention_block(config), type(self).adapter, type(self).inner_class)


def install_meta_attention(model: nn.Module, cfg: MetaAttnConfig, adapter, inner_class: type) -> None:
    """Swap the inner model's and the attention modules' classes and give each attention a router
    and experts, in place; parameters are created on the attention's device and dtype."""
    inner = getattr(model, adapter.inner_attribute)
    inner.__class__ = inner_class
    for attention in adapter.attention_modules(model):
        reference = next(attention.parameters())
        attention.__class__ = adapter.attention_class
        attention.meta = MetaAttention(cfg).to(device=reference.device, dtype=reference.dtype)
