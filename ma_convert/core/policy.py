"""`RoutingPolicy`: how a Meta-Attention layer runs (routing mode, full tail, kernel backend), apart
from what its checkpoint is (`MetaAttnConfig`). A converted model saves its default policy beside
its config and applies it on load; `set_routing_mode` and `routing_policy` change it at run time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

# Kernel backends: "auto" picks Triton on CUDA, torch elsewhere (the one list is the kernels').
from ..kernels.backends import BACKEND_NAMES as BACKENDS
from .config import FORMAT_VERSION, MetaAttnConfig, check_fields, checker, is_int, is_num, migrate_fields

ROUTING_MODES = ("soft", "hard", "auto")
# Backends removed on 2026-12-03: "fla" ran the triton kernels (fla-core was no longer called);
# "flash_attn" and "xformers" differed from them only in all-full calls, where SDPA serves as well;
# "flex" (FlexAttention for the softmax experts) was slower than them at every length measured.
REMOVED_BACKENDS = ("fla", "flash_attn", "xformers", "flex")
UNCERTAIN_ROUTES = ("full", "soft")


@dataclass(frozen=True)
class RoutingPolicy:
    """How tokens are routed at run time.

    - ``mode``: "soft" (every expert runs, outputs mixed), "hard" (each token to its one top
      expert) or "auto" (hard, but tokens more uncertain than ``uncertainty_threshold`` go to
      ``uncertain_route``: the full expert, or stay soft).
    - ``full_tail``: hard and auto routing at inference send the last this-many tokens of every
      forward (the end of a prompt, and so every generated token) to the full expert.
    - ``backend`` / ``dense_below``: the kernels of the GPU fast path (docs/backends.md).
    """

    mode: str = "soft"
    uncertainty_threshold: Optional[float] = None
    uncertain_route: str = "full"  # where tokens above the threshold go: "full" or "soft"
    # Reading a fact back from far away happens at the end of a prompt, and a learned router at a
    # tight budget loses it (benchmarks/results/quality.md): a full tail keeps it.
    full_tail: int = 0
    backend: str = "auto"
    # GPU fast path, hard routing: while the context (prompt and cache) is shorter than this, every
    # token runs on the full expert, with no router: the original attention at its own speed, which
    # gathering cannot beat there. None: the measured crossover (ma_convert.kernels.spec.DENSE_BELOW);
    # 0: always route.
    dense_below: Optional[int] = None

    def __post_init__(self) -> None:
        need = checker(self)
        need(self.mode in ROUTING_MODES, "mode", f"one of {ROUTING_MODES}")
        threshold = self.uncertainty_threshold
        need(threshold is None or (is_num(threshold) and 0.0 < threshold <= 1.0), "uncertainty_threshold",
             "None or a number in (0, 1]")
        need(threshold is not None or self.mode != "auto", "uncertainty_threshold",
             "a number in (0, 1] with mode 'auto'")
        need(self.uncertain_route in UNCERTAIN_ROUTES, "uncertain_route", f"one of {UNCERTAIN_ROUTES}")
        need(is_int(self.full_tail) and self.full_tail >= 0, "full_tail", "an integer >= 0")
        need(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        need(self.dense_below is None or (is_int(self.dense_below) and self.dense_below >= 0), "dense_below",
             "None or an int >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RoutingPolicy":
        """A saved policy. Those saved before 2026-12-03 hold ``hard_top_k``, always 1 then in practice:
        hard routing now sends each token to one expert, so 1 is dropped and any other value refused;
        and their backend may be one removed then, whose routed calls ran the ``triton`` kernels: read
        as ``triton``."""
        data = dict(data)
        if data.get("backend") in REMOVED_BACKENDS:
            data["backend"] = "triton"
        if data.pop("hard_top_k", 1) != 1:
            raise ValueError("RoutingPolicy.hard_top_k is no longer supported: hard routing sends each token to "
                             "its one top expert")
        check_fields(cls, data)
        return cls(**data)

    def replace(self, **changes: Any) -> "RoutingPolicy":
        """A validated copy with some fields changed (unknown names are errors)."""
        check_fields(RoutingPolicy, changes)
        return replace(self, **changes)


def split_saved_block(block: dict) -> tuple[MetaAttnConfig, RoutingPolicy]:
    """The config and the default policy of a saved ``meta_attention`` block (``attention``, and
    ``policy`` beside it), of any format: format 1 kept the policy among the config fields
    (`migrate_fields`). A ``policy`` mapping wins over policy fields found in ``attention``."""
    attention, policy = migrate_fields(block["attention"])
    saved = block.get("policy") or {}
    if not isinstance(saved, dict):
        raise ValueError(f"the saved routing policy must be a mapping, got {type(saved).__name__}")
    cfg = MetaAttnConfig.from_dict({**attention, "format_version": FORMAT_VERSION})
    return cfg, RoutingPolicy.from_dict({**policy, **saved})
