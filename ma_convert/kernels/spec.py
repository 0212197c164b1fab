"""What the routed kernels need to know about a layer's experts, as plain values and tensors.

The core builds a `RoutedSpec` from its experts (`MetaAttention.routed_spec`); the kernels read
nothing else of it, and import nothing from the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

NO_WINDOW = 1 << 30  # the "window" of an expert that sees every earlier key
# Contexts shorter than this run all-full on the fast path (RoutingPolicy.dense_below overrides): on
# an H100 gathering loses below ~8k tokens (benchmarks/results/attention_*.md).
DENSE_BELOW = 8192


@dataclass
class RoutedSpec:
    """The three built-in experts of one layer: where each sits among the layer's experts, and its settings.

    `kernel` is the kernel-attention expert: pure linear (`kernel_window` 0) or the hybrid
    (exact softmax over its last `kernel_window` keys and its `kernel_sinks` first keys, kernel
    attention over the keys in between, one normalisation, the kernel part weighted by
    exp(`log_weight[h]`)). `reason` says why the kernels cannot serve the layer (None: they can).
    """

    n_experts: int
    full: Optional[int] = None
    kernel: Optional[int] = None
    local: Optional[int] = None
    full_window: Optional[int] = None  # the base model's own window, kept by the full expert
    local_window: int = 0
    local_sinks: int = 0
    kernel_window: int = 0
    kernel_sinks: int = 0
    q_map_weight: Optional[torch.Tensor] = None  # Hedgehog (Hq, d, d); None: ELU+1
    k_map_weight: Optional[torch.Tensor] = None  # Hedgehog (Hkv, d, d); None: ELU+1
    log_weight: Optional[torch.Tensor] = None  # hybrid only, (Hq,)
    router: Optional["RouterWeights"] = None  # for the routing kernel
    reason: Optional[str] = None
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def hybrid(self) -> bool:
        return self.kernel_window > 0

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """Device copies of the small per-expert tables, made once per device (on the fast path, where
        the three experts are set): "window" and "sinks" (E,) int32, the keys a softmax read covers
        (NO_WINDOW: all earlier ones; 0: none) and the sink keys of each expert; "full" / "local" /
        "kernel": that expert's (index, window, sinks) column for one prefill launch; "softmax": the
        columns of every expert with a softmax part (full, local, and the hybrid), for one launch
        serving them all."""
        key = (name, device)
        if key not in self._tables:
            windows, sinks = [0] * self.n_experts, [0] * self.n_experts
            windows[self.full] = self.full_window or NO_WINDOW
            windows[self.local], sinks[self.local] = self.local_window, self.local_sinks
            windows[self.kernel], sinks[self.kernel] = self.kernel_window, self.kernel_sinks  # 0, 0: pure linear
            if name in ("window", "sinks"):
                values = windows if name == "window" else sinks
            else:
                names = ("full", "local") + (("kernel",) if self.hybrid else ()) if name == "softmax" else (name,)
                indices = [getattr(self, n) for n in names]
                values = [indices, [windows[i] for i in indices], [sinks[i] for i in indices]]
            self._tables[key] = torch.tensor(values, dtype=torch.int32, device=device)
        return self._tables[key]


@dataclass
class RouterWeights:
    """A router MLP as the routing kernel reads it: LayerNorm over [x, ||x||/sqrt(D), pos], Linear,
    GELU, Linear. Tensors are the module's own parameters (shared, not copied); the temperature, which
    training schedules move, is passed on every call instead."""

    norm_weight: torch.Tensor  # (D + 2,)
    norm_bias: torch.Tensor
    norm_eps: float
    fc1_weight: torch.Tensor  # (H, D + 2)
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor  # (K, H)
    fc2_bias: torch.Tensor
    max_positions: int
    concentration_eps: float  # the Bayesian router's floor on concentrations (auto routing reads it)
