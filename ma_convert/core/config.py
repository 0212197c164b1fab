"""`MetaAttnConfig`: every knob of a Meta-Attention layer, validated on construction."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

# Kernel backends: "auto" picks Triton on CUDA, torch elsewhere (the one list is the kernels').
from ..kernels.backends import BACKEND_NAMES as BACKENDS

# Bumped whenever a saved config could be read differently by an older version.
FORMAT_VERSION = 1

ROUTERS = ("bayesian", "softmax")
PRIORS = ("compute", "uniform")
FEATURE_MAPS = ("elu", "hedgehog")
UNCERTAIN_ROUTES = ("full", "soft")
ROUTING_MODES = ("soft", "hard", "auto")


@dataclass
class MetaAttnConfig:
    """Configuration of one Meta-Attention layer.

    The defaults are the three built-in experts ``[full, linear, local]`` with costs
    ``[1.0, 0.15, 0.30]``, a Bayesian Dirichlet router and soft routing.

    Routing mode is derived from two fields: ``hard_routing=False`` is *soft* (every
    expert runs, outputs mixed); ``hard_routing=True`` is *hard*; with an
    ``uncertainty_threshold`` as well it is *auto* (tokens more uncertain than the
    threshold go to ``uncertain_route``). See :attr:`routing_mode`.
    """

    # --- shape ---------------------------------------------------------------------------
    d_model: int = 512
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    causal: bool = True  # False for encoders: every expert becomes bidirectional
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
    backend: str = "auto"
    # GPU fast path, hard routing: while the context (prompt and cache) is shorter than this, every
    # token runs on the full expert, with no router: the original attention at its own speed, which
    # gathering cannot beat there. None: the measured crossover (ma_convert.kernels.spec.DENSE_BELOW);
    # 0: always route.
    dense_below: Optional[int] = None

    # --- router --------------------------------------------------------------------------
    router: str = "bayesian"  # "bayesian" (Dirichlet posterior) or "softmax" (prior-free ablation)
    controller_hidden: int = 64
    temperature: float = 1.0
    concentration_eps: float = 1e-3  # floor on Dirichlet concentrations
    sample_posterior: bool = True  # training: reparameterised Dirichlet samples instead of the mean

    # --- objective -----------------------------------------------------------------------
    prior: str = "compute"  # Dir(beta0 * pi); "compute": pi proportional to 1 / cost
    beta0: float = 3.0  # total prior concentration; 3 with a uniform prior is the flat Dir(1,1,1)
    kl_weight: float = 1.0
    cost_lambda: float = 0.0
    entropy_coeff: float = 0.0

    # --- routing mode --------------------------------------------------------------------
    hard_routing: bool = False
    hard_top_k: int = 1
    gumbel_temp: float = 1.0
    uncertainty_threshold: Optional[float] = None
    uncertain_route: str = "full"  # where tokens above the threshold go: "full" or "soft"
    # Hard and auto routing at inference: the last `full_tail` tokens of every forward (the end of a
    # prompt, and so every generated token) go to the full expert whatever the router says. Reading a
    # fact back from far away happens there, and a learned router at a tight budget loses it
    # (benchmarks/results/quality.md).
    full_tail: int = 0

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

    @property
    def routing_mode(self) -> str:
        if not self.hard_routing:
            return "soft"
        return "hard" if self.uncertainty_threshold is None else "auto"

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(
                    f"MetaAttnConfig.{name}={getattr(self, name)!r} is invalid: must be {allowed}"
                )

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.d_model) and self.d_model >= 1, "d_model", "an integer >= 1")
        need(is_int(self.n_heads) and self.n_heads >= 1, "n_heads", "an integer >= 1")
        need(
            self.n_kv_heads is None
            or (is_int(self.n_kv_heads) and self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0),
            "n_kv_heads",
            f"None or a divisor of n_heads={self.n_heads}",
        )
        need(self.head_dim is None or (is_int(self.head_dim) and self.head_dim >= 1), "head_dim", "None or an integer >= 1")
        need(
            self.head_dim is not None or self.d_model % self.n_heads == 0,
            "n_heads",
            f"a divisor of d_model={self.d_model} (or set head_dim explicitly)",
        )
        need(isinstance(self.causal, bool), "causal", "True or False")
        need(is_int(self.max_positions) and self.max_positions >= 1, "max_positions", "an integer >= 1")
        need(
            len(self.expert_costs) >= 1 and all(math.isfinite(c) and c > 0 for c in self.expert_costs),
            "expert_costs",
            "a non-empty list of finite costs > 0",
        )
        need(self.full_window is None or (is_int(self.full_window) and self.full_window >= 1), "full_window", "None or an integer >= 1")
        need(is_int(self.window_size) and self.window_size >= 1, "window_size", "an integer >= 1")
        need(
            self.full_window is None or self.window_size <= self.full_window,
            "window_size",
            f"at most full_window={self.full_window} (the full expert's own window)",
        )
        need(is_int(self.sink_tokens) and self.sink_tokens >= 0, "sink_tokens", "an integer >= 0")
        need(self.feature_map in FEATURE_MAPS, "feature_map", f"one of {FEATURE_MAPS}")
        need(is_int(self.linear_window) and self.linear_window >= 0, "linear_window", "an integer >= 0")
        need(not (self.linear_window and not self.causal), "linear_window", "0 for bidirectional attention (causal=False)")
        need(is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        need(self.dense_below is None or (is_int(self.dense_below) and self.dense_below >= 0), "dense_below",
             "None or an int >= 0")
        need(self.router in ROUTERS, "router", f"one of {ROUTERS}")
        need(is_int(self.full_tail) and self.full_tail >= 0, "full_tail", "an integer >= 0")
        need(is_int(self.controller_hidden) and self.controller_hidden >= 1, "controller_hidden", "an integer >= 1")
        need(is_num(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        need(is_num(self.concentration_eps) and self.concentration_eps > 0, "concentration_eps", "a number > 0")
        need(isinstance(self.sample_posterior, bool), "sample_posterior", "True or False")
        need(self.prior in PRIORS, "prior", f"one of {PRIORS}")
        need(is_num(self.beta0) and self.beta0 > 0, "beta0", "a number > 0")
        need(is_num(self.kl_weight) and self.kl_weight >= 0, "kl_weight", "a number >= 0")
        need(is_num(self.cost_lambda) and self.cost_lambda >= 0, "cost_lambda", "a number >= 0")
        need(is_num(self.entropy_coeff), "entropy_coeff", "a finite number")
        need(isinstance(self.hard_routing, bool), "hard_routing", "True or False")
        need(
            is_int(self.hard_top_k) and 1 <= self.hard_top_k <= self.n_experts,
            "hard_top_k",
            f"an integer in [1, {self.n_experts}] (the number of experts)",
        )
        need(is_num(self.gumbel_temp) and self.gumbel_temp > 0, "gumbel_temp", "a number > 0")
        need(
            self.uncertainty_threshold is None
            or (is_num(self.uncertainty_threshold) and 0.0 < self.uncertainty_threshold <= 1.0),
            "uncertainty_threshold",
            "None or a number in (0, 1]",
        )
        need(self.uncertain_route in UNCERTAIN_ROUTES, "uncertain_route", f"one of {UNCERTAIN_ROUTES}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "MetaAttnConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"MetaAttnConfig format_version={version!r} is newer than this ma_convert understands "
                f"({FORMAT_VERSION}); upgrade ma-convert"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MetaAttnConfig has no field(s) {unknown}; known fields: {sorted(known)}")
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
        return cls(
            **{
                "d_model": 4096,
                "n_heads": 32,
                "head_dim": 128,
                "max_positions": 4096,
                "window_size": 1024,
                "controller_hidden": 128,
                **overrides,
            }
        )


PRESETS = ("small", "base", "large", "gpt2", "llama_7b")
