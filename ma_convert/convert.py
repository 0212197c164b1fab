"""`convert`: turn a loaded Hugging Face causal LM into its Meta-Attention version, in place."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from .adapters import adapter_for
from .core.config import MetaAttnConfig
from .core.policy import RoutingPolicy
from .modeling.base import install_meta_attention, meta_attention_block, read_meta_attention_block
from .sources import ModelSource, ModelSourceError, drop_gguf_quantization, error_summary, public_name, resolve_source


def convert_config(config: Any, cfg: Optional[MetaAttnConfig] = None, *, base_model: Optional[str] = None,
                   policy: Optional[RoutingPolicy] = None, **overrides: Any):
    """The converted (``Ma<Arch>Config``) twin of an original model config, with `policy` (default:
    soft routing) as the routing it loads with.

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
        base_model=public_name(base_model or getattr(config, "_name_or_path", None)),
        base_revision=getattr(config, "_commit_hash", None),
        base_type=config.model_type,
        policy=policy,
    )
    new_config = adapter.config_class.from_dict(values)
    new_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return new_config


def convert(
    model: nn.Module, cfg: Optional[MetaAttnConfig] = None, *, base_model: Optional[str] = None,
    policy: Optional[RoutingPolicy] = None, **overrides: Any,
) -> nn.Module:
    """Convert `model` in place and return it.

    Every attention layer becomes Meta-Attention; the original parameters keep their names and
    tensors, so with ``force_expert(model, "full")`` the model computes exactly what it did.
    `cfg` and `overrides` set the experts and the router; heads, head_dim and positions come from
    the model's config (a contradicting value is an error). `policy` is how it routes (default:
    soft), saved with it as the routing it loads with.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model).__name__}")
    new_config = convert_config(config, cfg, base_model=base_model, policy=policy, **overrides)
    adapter = adapter_for(config.model_type)
    if not isinstance(model, adapter.original_causal_lm_class):
        raise TypeError(f"convert expects a {adapter.original_causal_lm_class.__name__}, got {type(model).__name__}")
    model.__class__ = adapter.causal_lm_class
    install_meta_attention(model, *read_meta_attention_block(new_config))
    for module in model.modules():  # every submodule holding the old config object gets the new one
        if getattr(module, "config", None) is config:
            module.config = new_config
    return model


def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    cfg: Optional[MetaAttnConfig] = None,
    *,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    base_model: Optional[str] = None,
    verbose: bool = True,
    policy: Optional[RoutingPolicy] = None,
    **overrides: Any,
) -> Path:
    """Convert a checkpoint (local folder, Hub id or .gguf file) and save it to `out_dir` with a model card.

    Everything that can be checked is checked before any weight is read: the source, the output
    folder, the dtype, the architecture and the config. The model is converted in place (no second
    copy) and written atomically, tokenizer included when the source has one. `base_model` names
    the original in config.json and the card (default: the source's Hub id or file name); `policy` is
    the routing the model loads with (default: soft). Returns `out_dir`.
    """
    import torch

    from .card import conversion_card_info, render_model_card
    from .hub import atomic_directory, check_output_dir

    say = print if verbose else (lambda *a, **k: None)
    source = resolve_source(src)
    sources = [source.local_path] if source.local_path is not None else []
    check_output_dir(out_dir, overwrite, sources)
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (float32, bfloat16, float16)")
    say(f"[1/4] reading the config of {src}")
    config = load_config(source)
    # An unsupported architecture or a contradicting config fails now.
    convert_config(config, cfg, policy=policy, **overrides)
    say(f"[2/4] loading the {config.model_type} weights")
    model = load_model(source, dtype=getattr(torch, dtype) if dtype else None)
    say("[3/4] converting the attention layers")
    convert(model, cfg, base_model=base_model or source.name, policy=policy, **overrides)
    say(f"[4/4] writing {out_dir}")
    try:
        with atomic_directory(out_dir, overwrite, sources) as tmp:
            model.save_pretrained(tmp)
            tokenizer = load_tokenizer(source)
            if tokenizer is None:
                say("      (the source has no tokenizer; none saved)")
            else:
                tokenizer.save_pretrained(tmp)
            render_model_card(tmp, conversion_card_info(model, source))
    except OSError as error:  # a full disk as a one-line error; the temporary folder is already gone
        if error.errno != errno.ENOSPC:
            raise
        raise OSError(error.errno, f"no space left on the device while writing {out_dir}; nothing was written") \
            from None
    return Path(out_dir)


def load_config(source: ModelSource):
    """The source's transformers config, or a one-line error naming the source."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.location, **source.load_kwargs)
    except Exception as error:  # OSError, JSON errors, and the config classes' own validation errors
        where = source.location if source.local_path else f"{source.location} (no such local folder; as a Hub id)"
        raise ModelSourceError(f"cannot read the config of {where}: {error_summary(error)}") from None


def load_model(source: ModelSource, dtype=None):
    """The source's causal LM (de-quantized if it is a GGUF), or a one-line error naming what failed."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.load_kwargs)
    except Exception as error:  # safetensors, torch and hub errors alike: say which source failed
        raise ModelSourceError(f"could not load the weights of {source.location}: {type(error).__name__}: "
                               f"{error_summary(error)}") from None
    drop_gguf_quantization(model)
    return model


def load_tokenizer(source: ModelSource):
    """The source's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **source.load_kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None
