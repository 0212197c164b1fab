"""What every converted architecture shares: the config block, weight initialisation, conversion.

A converted model is the original model class with three changes, made in place so that every
original parameter keeps its name and its tensor:

- the config becomes ``Ma<Arch>Config`` (``model_type`` ``ma_<arch>``) with a ``meta_attention``
  block: format version, converter version, base model, the `MetaAttnConfig` (``attention``) and
  the default `RoutingPolicy` (``policy``), which every module takes on load;
- each attention module becomes the architecture's routed subclass, with a ``meta`` submodule
  (router + experts);
- the inner model becomes a subclass whose ``_init_weights`` knows the new parameters:
  transformers initialises missing weights with the *inner* model's ``_init_weights``, and
  parameters it does not know would load as uninitialised memory.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn
from transformers.utils import cached_file

from ..core.config import FORMAT_VERSION, MetaAttnConfig
from ..core.initial import InitialValues, tensor_named
from ..core.meta_attention import MetaAttention
from ..core.policy import RoutingPolicy, split_saved_block
from ..version import __version__ as CONVERTER_VERSION
from .attention import cache_argument

# The format of the config's `meta_attention` block (the MetaAttnConfig inside has its own).
# 2: the routing policy beside the config, as `policy`.
BLOCK_FORMAT_VERSION = 2


def meta_attention_block(cfg: MetaAttnConfig, base_model: Optional[str], base_revision: Optional[str], base_type: str,
                         policy: Optional[RoutingPolicy] = None) -> dict:
    return {
        "format_version": BLOCK_FORMAT_VERSION,
        "converter_version": CONVERTER_VERSION,
        "base_model": base_model,
        "base_model_revision": base_revision,
        "base_model_type": base_type,
        "attention": cfg.to_dict(),
        "policy": (policy or RoutingPolicy()).to_dict(),
    }


def current_block(block: dict, cfg: MetaAttnConfig, policy: RoutingPolicy) -> dict:
    """`block` in this version's format: the config and the policy as read, the rest kept."""
    return {**block, "format_version": BLOCK_FORMAT_VERSION, "attention": cfg.to_dict(), "policy": policy.to_dict()}


def read_meta_attention_block(config) -> tuple[MetaAttnConfig, RoutingPolicy]:
    """The MetaAttnConfig and default RoutingPolicy of a converted model's config, checked for a
    format we can read (older formats are migrated)."""
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
    return split_saved_block(block)


def init_meta_weights(module: nn.Module) -> bool:
    """Initialise what a Meta-Attention module holds, from its own `initial_values` (the values its
    constructor starts from), leaving tensors loaded from the checkpoint alone; False if `module` is
    not one. Non-persistent buffers (costs, the prior) are never loaded, so always recomputed."""
    if not isinstance(module, InitialValues):
        return False
    for name, value in module.initial_values().items():
        tensor = tensor_named(module, name)
        if not getattr(tensor, "_is_hf_initialized", False):  # transformers' mark of a loaded tensor
            with torch.no_grad():
                tensor.copy_(value)
    return True


class MetaInitMixin:
    """`_init_weights` that also initialises routers and expert parameters."""

    def _init_weights(self, module: nn.Module) -> None:
        if not init_meta_weights(module):
            super()._init_weights(module)


class MetaCausalLMMixin(MetaInitMixin):
    """Builds the routed attention modules of a converted causal LM on construction."""

    adapter: ClassVar[Any]  # the architecture's adapter, which sets it
    inner_class: ClassVar[type]  # the Ma inner model

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        cfg, policy = read_meta_attention_block(config)
        # An older format is rewritten as read, so that saving writes this version's.
        config.meta_attention = current_block(config.meta_attention, cfg, policy)
        install_meta_attention(self, cfg, policy)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' `from_pretrained`, but a converted checkpoint that lacks any weight is an
        error, not a warning with random weights. (An original checkpoint loaded into the converted
        class with a converted `config=` may lack the router and expert weights; they initialise.)"""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"])
        original = _checkpoint_is_original(pretrained_model_name_or_path, kwargs)
        if missing and not (original and all(".meta." in key for key in missing)):
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks {len(missing)} expected weight(s), e.g. {missing[:3]}; "
                f"the checkpoint is incomplete or was not saved by ma_convert"
            )
        _refuse_non_finite_meta_weights(model, pretrained_model_name_or_path)
        _warn_if_remote_code_is_stale(pretrained_model_name_or_path, model.config.model_type)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, plus self-contained remote code and `auto_map`, so the folder
        also loads with ``trust_remote_code=True`` where ma_convert is not installed."""
        remote_code = _remote_code_module()
        if remote_code is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        adapter = type(self).adapter
        self.config.auto_map = remote_code.auto_map(
            adapter.config_class.model_type, adapter.config_class.__name__, type(self).__name__
        )
        result = super().save_pretrained(save_directory, *args, **kwargs)
        remote_code.write_remote_code(save_directory, adapter)
        return result


def _refuse_non_finite_meta_weights(model, path) -> None:
    """Routers or experts with NaN/inf weights would route every token to garbage: refuse at load."""
    bad = [name for name, p in model.named_parameters() if ".meta." in name and not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"{path}: {len(bad)} router/expert weight(s) are not finite (NaN or inf), e.g. {bad[0]}; "
                         "the checkpoint is damaged: export it again, or resume training from an earlier checkpoint")


def _remote_code_module():
    """ma_convert.remote_code, or None when this file runs as remote code itself (which has no such module)."""
    try:  # a string import: transformers' remote-code scanner must not follow it
        return importlib.import_module("..remote_code", __package__)
    except (ImportError, ValueError, TypeError):
        return None


def _warn_if_remote_code_is_stale(path, model_type: str) -> None:
    """A local folder exported by an older ma-convert loads fine here, but its remote code may not
    where ma_convert is missing: say so, and how to fix it."""
    remote_code = _remote_code_module()
    if remote_code is not None and Path(str(path)).is_dir():
        message = remote_code.stale_remote_code_message(path, model_type)
        if message:
            warnings.warn(message, UserWarning, stacklevel=3)


def _checkpoint_is_original(path, kwargs) -> bool:
    """Whether the checkpoint's own config.json (folder, subfolder or Hub id) is an unconverted model's."""
    try:
        file = cached_file(
            str(path), "config.json", subfolder=kwargs.get("subfolder", ""), revision=kwargs.get("revision"),
            _raise_exceptions_for_missing_entries=False,
        )
    except OSError:
        file = None
    if file is None:
        return False  # no config to tell: treat as converted, so missing weights are errors
    with open(file) as handle:
        return "meta_attention" not in json.load(handle)


def _capturing(tensor: torch.Tensor) -> bool:
    """A CUDA graph capture or a torch.compile trace is running: a host sync would fail or break it."""
    return torch.compiler.is_compiling() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_inputs(model, args, kwargs) -> None:
    """Forward pre-hook: inputs the model cannot run are refused with a clear error instead of failing
    deep inside (GPT-2's position table, an embedding lookup, a CUDA device assert): an empty
    input, a sequence longer than the model's positions (RoPE models would also leave the range the
    router's position feature was scaled for) and, in a prompt, token ids outside the vocabulary.
    A hook, not a `forward` override, so that transformers still sees the original forward's
    signature (generate() builds position_ids and masks from it)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = ids if ids is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return
    if tokens.dim() < 2 or tokens.shape[1] == 0:
        raise ValueError(f"the input is empty (shape {tuple(tokens.shape)}); give at least one token per row")
    cache = cache_argument(kwargs)
    static = getattr(cache, "is_compileable", False)  # reading a static cache's length would sync (break a graph)
    if static and tokens.shape[1] == 1:
        return  # a static cache's decode step: the cache's size bounds the sequence
    cached = 0 if cache is None or static else cache.get_seq_length()
    length = tokens.shape[1] + cached
    if length > model.ma_max_positions:
        raise ValueError(
            f"the sequence has {length} tokens but the model handles at most {model.ma_max_positions} positions "
            f"(max_position_embeddings); shorten the input"
        )
    # Only a prompt: decode steps feed back the model's own tokens.
    if ids is not None and cached == 0 and not _capturing(ids):
        vocab = model.get_input_embeddings().num_embeddings
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"token id {high if high >= vocab else low} is outside the vocabulary (0..{vocab - 1})")


def install_meta_attention(model: nn.Module, cfg: MetaAttnConfig, policy: Optional[RoutingPolicy] = None) -> None:
    """Swap the inner model's and the attention modules' classes for those of `model`'s (converted)
    class and give each attention a router and experts routing by `policy`, in place; parameters are
    created on the attention's device and dtype."""
    adapter = type(model).adapter
    model.ma_max_positions = cfg.max_positions
    model.register_forward_pre_hook(_check_inputs, with_kwargs=True)
    model.base_model.__class__ = type(model).inner_class
    for attention in adapter.attention_modules(model):
        reference = next(attention.parameters())
        attention.__class__ = adapter.attention_class
        # A new module starts in training mode; it takes the model's, so a converted eval model routes
        # as at inference (no Gumbel sampling) without another .eval().
        meta = MetaAttention(cfg, policy=policy)
        attention.meta = meta.to(device=reference.device, dtype=reference.dtype).train(attention.training)
