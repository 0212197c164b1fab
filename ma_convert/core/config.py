"""`MetaAttnConfig`: what a Meta-Attention checkpoint is (shape, experts, router), validated on construction.

How a layer runs is its `RoutingPolicy` (core/policy.py); how it trains, its `ObjectiveWeights`
(core/objective.py). Format 1 kept both among the config fields: `migrate_fields` reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

# Bumped whenever a saved config could be read differently by an older version.
# 2: the routing policy and the objective weights left the config.
# 3: the router's prior (`prior`, `beta0`) left it too: it is the ELBO's, a training setting.
# 4: `causal` and `concentration_eps` left it: a converted model is always causal (the standalone layer
#    takes `causal=` itself), and the Dirichlet floor is the Bayesian router's constant.
FORMAT_VERSION = 4

ROUTERS = ("bayesian", "softmax")
FEATURE_MAPS = ("elu", "hedgehog")
# MetaAttnConfig's integer fields with their minimum; those in OPTIONAL_INTS may also be None.
INT_MINIMUMS = {"d_model": 1, "n_heads": 1, "head_dim": 1, "max_positions": 1, "full_window": 1, "window_size": 1,
                "sink_tokens": 0, "linear_window": 0, "controller_hidden": 1}
OPTIONAL_INTS = ("head_dim", "full_window")

# Format 1's config fields that are now the routing policy's (hard_routing becomes its `mode`) ...
V1_POLICY_FIELDS = ("hard_routing", "hard_top_k", "uncertainty_threshold", "uncertain_route", "full_tail", "backend",
                    "dense_below")
# ... and those that are now training's objective weights (dropped when an old config is read).
V1_OBJECTIVE_FIELDS = ("kl_weight", "cost_lambda", "entropy_coeff", "gumbel_temp", "sample_posterior")
# Format 2's config fields that are now training's objective weights (dropped when an old config is read).
V2_OBJECTIVE_FIELDS = ("prior", "beta0")
# The Bayesian router's floor on Dirichlet concentrations: keeps sampling and the KL finite when softplus
# underflows. A config field (`concentration_eps`) until format 3.
CONCENTRATION_FLOOR = 1e-3
# Format 3's fields that became constants, with the only value this version reads them at.
V3_FIXED_FIELDS = {"causal": True, "concentration_eps": CONCENTRATION_FLOOR}


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(cls: type, names, hint=lambda unknown: "") -> None:
    """Raise ValueError unless every one of `names` is a field of the dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}{hint(unknown)}; known fields: {sorted(known)}")


def checker(obj: Any):
    """`need(ok, name, allowed)`: raise ValueError naming `obj`'s class, field and value unless ok."""

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r} is invalid: must be {allowed}")

    return need


def migrate_fields(data: dict) -> tuple[dict, dict]:
    """A saved config mapping of any format -> (MetaAttnConfig fields, RoutingPolicy fields).

    The one place old formats are read. Format 1 (or no format_version) kept the runtime policy and
    the training weights among the config fields: the policy's move to the policy, with
    hard_routing and uncertainty_threshold giving its mode as format 1's `routing_mode` did; the
    training weights are dropped (the training recipe sets them now). Formats 1 and 2 kept the
    router's prior, which only training reads: dropped too. Formats 1 to 3 kept `causal` and
    `concentration_eps`, now fixed: dropped at their fixed values, refused at any other.
    """
    data = dict(data)
    version = data.pop("format_version", 1)
    if not is_int(version) or version > FORMAT_VERSION:
        raise ValueError(
            f"MetaAttnConfig format_version={version!r} is newer than this ma_convert understands "
            f"({FORMAT_VERSION}); upgrade ma-convert"
        )
    if version < 3:
        for name in V2_OBJECTIVE_FIELDS:
            data.pop(name, None)
    if version < 4:
        for name, fixed in V3_FIXED_FIELDS.items():
            value = data.pop(name, fixed)
            if value != fixed:
                raise ValueError(f"MetaAttnConfig.{name}={value!r} is no longer supported{moved_hint([name])}")
    if version >= 2:
        return data, {}
    policy = {name: data.pop(name) for name in V1_POLICY_FIELDS if name in data}
    for name in V1_OBJECTIVE_FIELDS:
        data.pop(name, None)
    if "hard_routing" in policy:
        hard = policy.pop("hard_routing")
        if not isinstance(hard, bool):
            raise ValueError(f"MetaAttnConfig.hard_routing={hard!r} is invalid: must be True or False")
        policy["mode"] = "soft" if not hard else ("hard" if policy.get("uncertainty_threshold") is None else "auto")
    return data, policy


@dataclass
class MetaAttnConfig:
    """Configuration of one Meta-Attention layer.

    The defaults are the three built-in experts ``[full, linear, local]`` with costs
    ``[1.0, 0.15, 0.30]`` and a Bayesian Dirichlet router. What a checkpoint is; how it routes
    (soft, hard, auto, the kernel backend) is its `RoutingPolicy`; how it trains (the KL's prior and
    the weights of the ELBO's terms), its `ObjectiveWeights`.
    """

    # --- shape ---------------------------------------------------------------------------
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    max_positions: int = 4096  # scales the router's position feature log1p(t)/log1p(max)

    # --- experts -------------------------------------------------------------------------
    expert_costs: list = field(default_factory=lambda: [1.0, 0.15, 0.30])
    full_window: Optional[int] = None  # full expert: the base model's own attention window (Mistral), if any
    window_size: int = 256  # local expert: each query sees its last `window_size` keys
    # local expert: the first keys every query may also see. Pretrained models park attention mass on
    # them (StreamingLLM's sinks); without them a window loses that mass, e.g. SmolLM2-135M forced to
    # local (W=256, T=2048) has perplexity 45.8 with 0 sinks and 24.9 with 4 (original 20.6).
    sink_tokens: int = 4
    feature_map: str = "hedgehog"  # linear expert: learnable "hedgehog" or fixed "elu" (ELU+1)
    # The kernel expert: 0 builds the pure linear expert; W > 0 the hybrid expert ("hybrid", its own class):
    # exact softmax over the last W keys and the sink tokens, kernel attention over the older keys, one
    # shared normalisation (LoLCATs). Measured on SmolLM2-135M (benchmarks/results/expert_fidelity_*.md):
    # relative MSE to full attention 0.395 pure, 0.108 with W=64 (the local expert at W=256: 0.106). Its
    # decoding reads the window from the KV cache and the older keys through a state lagging W keys.
    linear_window: int = 0
    dropout: float = 0.0  # attention-probability dropout of the softmax experts, training only

    # --- router --------------------------------------------------------------------------
    router: str = "bayesian"  # "bayesian" (Dirichlet posterior) or "softmax" (prior-free ablation)
    controller_hidden: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.expert_costs = [float(c) for c in self.expert_costs]
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def n_experts(self) -> int:
        return len(self.expert_costs)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        need = checker(self)
        for name, low in INT_MINIMUMS.items():
            value, optional = getattr(self, name), name in OPTIONAL_INTS
            need((optional and value is None) or (is_int(value) and value >= low), name,
                 f"{'None or ' if optional else ''}an integer >= {low}")
        kv = self.n_kv_heads
        need(kv is None or (is_int(kv) and kv >= 1 and self.n_heads % kv == 0), "n_kv_heads",
             f"None or a divisor of n_heads={self.n_heads}")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0, "n_heads",
             f"a divisor of d_model={self.d_model} (or set head_dim explicitly)")
        need(len(self.expert_costs) >= 1 and all(math.isfinite(c) and c > 0 for c in self.expert_costs),
             "expert_costs", "a non-empty list of finite costs > 0")
        need(self.full_window is None or self.window_size <= self.full_window, "window_size",
             f"at most full_window={self.full_window} (the full expert's own window)")
        for name, choices in (("feature_map", FEATURE_MAPS), ("router", ROUTERS)):
            need(getattr(self, name) in choices, name, f"one of {choices}")
        need(is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(is_num(self.temperature) and self.temperature > 0, "temperature", "a number > 0")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "MetaAttnConfig":
        """The config of a saved mapping, of any format (format 1's policy fields are dropped: read
        them with `core.policy.split_saved_block`)."""
        data, _ = migrate_fields(data)
        check_fields(cls, data, moved_hint)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MetaAttnConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "MetaAttnConfig":
        """A validated copy with some fields changed."""
        return replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def small(cls, **overrides: Any) -> "MetaAttnConfig":
        """128-d, 4 heads: unit tests and quick ablations."""
        return cls(**{"d_model": 128, "n_heads": 4, "window_size": 32, "controller_hidden": 32, **overrides})

    @classmethod
    def base(cls, **overrides: Any) -> "MetaAttnConfig":
        """512-d, 8 heads."""
        return cls(**{"d_model": 512, "n_heads": 8, **overrides})

    @classmethod
    def large(cls, **overrides: Any) -> "MetaAttnConfig":
        """1024-d, 16 heads."""
        return cls(**{"d_model": 1024, "n_heads": 16, "window_size": 512, "controller_hidden": 128, **overrides})

    @classmethod
    def gpt2(cls, **overrides: Any) -> "MetaAttnConfig":
        """GPT-2 small: 768-d, 12 heads, 1024 positions."""
        return cls(**{"d_model": 768, "n_heads": 12, "max_positions": 1024, "window_size": 128, **overrides})

    @classmethod
    def llama_7b(cls, **overrides: Any) -> "MetaAttnConfig":
        """LLaMA-7B: 4096-d, 32 heads of 128, 4096 positions."""
        return cls(**{"d_model": 4096, "n_heads": 32, "head_dim": 128, "max_positions": 4096, "window_size": 1024,
                      "controller_hidden": 128, **overrides})


PRESETS = ("small", "base", "large", "gpt2", "llama_7b")


def moved_hint(names) -> str:
    """Where former config fields went, for an error about them ('' if none of `names` moved)."""
    policy = [n for n in names if n in V1_POLICY_FIELDS]
    objective = [n for n in names if n in V1_OBJECTIVE_FIELDS + V2_OBJECTIVE_FIELDS]
    hints = []
    if policy:
        hints.append(f"{policy} moved to the routing policy (RoutingPolicy; hard_routing is its mode)")
    if objective:
        hints.append(f"{objective} moved to training (ObjectiveWeights; the recipe's training section)")
    if "causal" in names:
        hints.append("causal is True for every converted model; MetaAttentionLayer(cfg, causal=False) is bidirectional")
    if "concentration_eps" in names:
        hints.append("concentration_eps is fixed at 1e-3, the Bayesian router's CONCENTRATION_FLOOR")
    return f" ({'; '.join(hints)})" if hints else ""
