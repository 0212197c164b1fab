"""Architecture adapters: how to find a model's attention modules and describe them to the router.

Each supported architecture has one file here with its adapter, its routed attention subclass and
its ``Ma*`` config and model classes. Everything the router needs (heads, kv heads, head_dim, the
position range) comes from the model's config.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch.nn as nn

from ..core.config import FORMAT_VERSION, MetaAttnConfig


class ArchitectureAdapter:
    """Describes one Hugging Face architecture to the converter."""

    attention_class: ClassVar[type]  # the routed subclass of the original attention
    causal_lm_class: ClassVar[type]  # Ma<Arch>ForCausalLM
    config_class: ClassVar[type]  # Ma<Arch>Config, set from causal_lm_class
    original_causal_lm_class: ClassVar[type]
    lora_targets: ClassVar[str]  # regex of the shared attention projections, for peft LoRA

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_class = cls.causal_lm_class.config_class
        cls.causal_lm_class.adapter = cls  # a converted model built from its config installs itself with it

    @classmethod
    def attention_modules(cls, model: nn.Module) -> list[nn.Module]:
        """The attention module of every decoder layer, in order."""
        return [layer.self_attn for layer in model.base_model.layers]

    @classmethod
    def derived_fields(cls, config: Any) -> dict:
        """MetaAttnConfig fields fixed by the model: shapes, position range, the base model's window."""
        heads = config.num_attention_heads
        return {
            "d_model": config.hidden_size,
            "n_heads": heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "max_positions": config.max_position_embeddings,
            # A base model's own attention window stays inside the full expert (Mistral, Phi-3).
            "full_window": getattr(config, "sliding_window", None),
        }

    @classmethod
    def meta_config(cls, config: Any, cfg: Optional[MetaAttnConfig] = None, **overrides: Any) -> MetaAttnConfig:
        """The MetaAttnConfig for this model: the user's settings on top of the model's own shape.

        A shape field the user set (an override, or a config value other than the default) that
        contradicts the model is an error rather than silently replaced.
        """
        derived = cls.derived_fields(config)
        defaults = MetaAttnConfig().to_dict()
        settings = {} if cfg is None else cfg.to_dict()
        given = {k: v for k, v in settings.items() if k in derived and v != defaults[k]}
        given.update({k: v for k, v in overrides.items() if k in derived})
        for name, value in sorted(given.items()):
            if value != derived[name]:
                raise ValueError(
                    f"MetaAttnConfig.{name}={value!r} contradicts the {config.model_type} model, which has "
                    f"{name}={derived[name]!r}; leave it unset to take the model's"
                )
        settings.update(overrides)
        if cfg is None and "dropout" not in overrides:  # the model's own attention dropout (GPT-2: attn_pdrop)
            dropout = getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", None)
            settings["dropout"] = float(dropout or 0.0)
        window = derived["full_window"]
        if window is not None and "window_size" not in overrides:
            settings["window_size"] = min(settings.get("window_size", defaults["window_size"]), window)
        sinks = settings.get("sink_tokens", defaults["sink_tokens"])
        if window is not None and "sink_tokens" not in overrides and sinks == defaults["sink_tokens"]:
            settings["sink_tokens"] = 0  # see below: a sliding-window model's cache has no first keys
        # This version's fields: a former one (hard_routing, ...) is an error saying where it went.
        meta = MetaAttnConfig.from_dict({**settings, **derived, "format_version": FORMAT_VERSION})
        if meta.n_experts != 3:  # converted models route among the three built-in experts
            raise ValueError(
                f"MetaAttnConfig.expert_costs={meta.expert_costs} is invalid for a converted model: give the "
                f"three costs of the full, linear and local experts"
            )
        if meta.full_window is not None and meta.sink_tokens:
            # Sinks are the first keys of the sequence, which a sliding-window KV cache drops.
            raise ValueError(
                f"sink_tokens={meta.sink_tokens} cannot be used with a sliding-window model "
                f"(sliding_window={meta.full_window}): its KV cache drops the first tokens; leave sink_tokens at 0"
            )
        if meta.full_window is not None and meta.linear_window:
            # The hybrid's kernel part reads the keys that left its window from the KV cache.
            raise ValueError(
                f"linear_window={meta.linear_window} cannot be used with a sliding-window model "
                f"(sliding_window={meta.full_window}): its KV cache drops the old keys the hybrid reads; leave "
                "linear_window at 0 (the pure linear expert keeps its own state)"
            )
        return meta
