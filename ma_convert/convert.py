"""`convert`: turn a loaded Hugging Face causal LM into its Meta-Attention version, in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from .adapters import adapter_for
from .core.config import MetaAttnConfig
from .modeling.base import install_meta_attention, meta_attention_block


def convert_config(config: Any, cfg: Optional[MetaAttnConfig] = None, *, base_model: Optional[str] = None, **overrides: Any):
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
        base_model=base_model or getattr(config, "_name_or_path", None) or None,
        base_revision=getattr(config, "_commit_hash", None),
        base_type=config.model_type,
    )
    new_config = adapter.config_class.from_dict(values)
    new_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return new_config


def convert(
    model: nn.Module, cfg: Optional[MetaAttnConfig] = None, *, base_model: Optional[str] = None, **overrides: Any
) -> nn.Module:
    """Convert `model` in place and return it.

    Every attention layer becomes Meta-Attention; the original parameters keep their names and
    tensors, so with ``force_expert(model, "full")`` the model computes exactly what it did.
    `cfg` and `overrides` set the experts and the router; heads, head_dim and positions come from
    the model's config (a contradicting value is an error).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model).__name__}")
    new_config = convert_config(config, cfg, base_model=base_model, **overrides)
    adapter = adapter_for(config.model_type)
    if not isinstance(model, adapter.original_causal_lm_class):
        raise TypeError(f"convert expects a {adapter.original_causal_lm_class.__name__}, got {type(model).__name__}")
    install_meta_attention(model, adapter.meta_config(config, cfg, **overrides), adapter, adapter.causal_lm_class.inner_class)
    model.__class__ = adapter.causal_lm_class
    for module in model.modules():  # every submodule holding the old config object gets the new one
        if getattr(module, "config", None) is config:
            module.config = new_config
    return model


def _resolve_source(src: str | Path) -> tuple[str, dict]:
    """(path or hub id, from_pretrained kwargs) for a folder, a hub id or a .gguf file."""
    path = Path(str(src))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    return str(src), {}


def _drop_gguf_quantization(model: nn.Module) -> None:
    """A GGUF checkpoint loads dequantized, but transformers keeps it marked as quantized and
    refuses to save it; the weights are plain tensors, so the mark can go."""
    if getattr(model, "quantization_method", None) is not None and "gguf" in str(model.quantization_method).lower():
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    cfg: Optional[MetaAttnConfig] = None,
    *,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    verbose: bool = True,
    **overrides: Any,
) -> Path:
    """Convert a checkpoint (local folder, Hub id or .gguf file) and save it to `out_dir`.

    Everything that can be checked is checked before any weight is read: the output folder, the
    source, the architecture and the config. The model is converted in place (no second copy)
    and written atomically, tokenizer included when the source has one. Returns `out_dir`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hub import atomic_directory, check_output_dir

    say = print if verbose else (lambda *a, **k: None)
    check_output_dir(out_dir, overwrite)
    source, extra = _resolve_source(src)
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (float32, bfloat16, float16)")
    say(f"[1/4] reading the config of {src}")
    config = AutoConfig.from_pretrained(source, **extra)
    convert_config(config, cfg, **overrides)  # unsupported architecture or contradicting config: fail now
    say(f"[2/4] loading the {config.model_type} weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype) if dtype else None, **extra)
    except Exception as error:  # safetensors, torch and hub errors alike: say which file failed
        raise ValueError(f"could not load the weights of {src}: {type(error).__name__}: {error}") from error
    _drop_gguf_quantization(model)
    say("[3/4] converting the attention layers")
    # A local source is recorded as an absolute path, so `verify` finds it from any directory.
    base = str(Path(str(src)).resolve()) if Path(str(src)).exists() else str(src)
    convert(model, cfg, base_model=base, **overrides)
    say(f"[4/4] writing {out_dir}")
    with atomic_directory(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(source, **extra).save_pretrained(tmp)
        except (OSError, ValueError, KeyError, TypeError) as error:
            say(f"      (no tokenizer saved: {str(error).splitlines()[0]})")
    return Path(out_dir)
