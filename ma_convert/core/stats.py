"""`RoutingStats`: what the routers decided, summed over tokens so layers aggregate by addition.

The sums stay on the device as one small tensor; nothing syncs with the host until a figure is read.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .objective import expected_cost, routing_entropy

# A token counts as collapsed when its routing distribution puts more than this on one expert.
COLLAPSE_THRESHOLD = 0.99


class RoutingStats:
    """Routing statistics over a set of tokens (one layer, or many aggregated with ``+``).

    - ``expert_fractions``: share of tokens each expert computes (hard routes; for soft routing,
      the expert a hard route would pick). They sum to 1, or to more when uncertain tokens stay
      soft (every expert runs on them).
    - ``entropy``: mean normalised entropy of the routing distribution, in [0, 1].
    - ``expected_cost``: mean soft cost sum_i w_i c_i.
    - ``projected_cost``: mean cost of the experts a token is (or would be) routed to, with
      full attention = 1.0.
    - ``collapsed_fraction``: share of tokens with more than 0.99 of their weight on one expert.
    - ``mean_uncertainty``: mean router uncertainty, in (0, 1).
    """

    def __init__(self, sums: torch.Tensor, costs: Sequence[float] | torch.Tensor) -> None:
        self._sums = sums  # [n_tokens, chosen per expert (K), entropy, expected, projected, collapsed, uncertainty]
        self._costs = costs

    @classmethod
    def from_routing(
        cls,
        mean: torch.Tensor,
        chosen: torch.Tensor,
        uncertainty: torch.Tensor,
        costs: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
    ) -> "RoutingStats":
        """mean: (B, T, K) routing distribution; chosen: (B, T, K) bool, the experts that run;
        valid: (B, T) bool, the tokens to count (padding excluded). No host sync."""
        with torch.no_grad():
            mean = mean.detach().float().flatten(0, -2)
            chosen = chosen.detach().float().flatten(0, -2)
            weight = torch.ones_like(mean[:, 0]) if valid is None else valid.flatten().to(mean)
            costs = costs.to(mean)
            per_token = torch.stack(
                [
                    routing_entropy(mean),
                    expected_cost(mean, costs),
                    expected_cost(chosen, costs),
                    (mean.amax(-1) > COLLAPSE_THRESHOLD).float(),
                    uncertainty.detach().float().flatten(),
                ],
                dim=-1,
            )
            sums = torch.cat([weight.sum(0, keepdim=True), weight @ chosen, weight @ per_token]).double()
        return cls(sums, costs)

    @property
    def costs(self) -> list[float]:
        if isinstance(self._costs, torch.Tensor):
            self._costs = self._costs.tolist()
        return [float(c) for c in self._costs]

    # -------------------------------------------------------------- aggregation
    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        if self.costs != other.costs:
            raise ValueError(f"cannot add RoutingStats over different experts: {self.costs} vs {other.costs}")
        return RoutingStats(self._sums + other._sums.to(self._sums.device), self.costs)

    @classmethod
    def aggregate(cls, stats: Iterable["RoutingStats"]) -> "RoutingStats":
        """Token-weighted aggregate of several layers' (or batches') stats."""
        stats = list(stats)
        if not stats:
            raise ValueError("RoutingStats.aggregate needs at least one RoutingStats")
        return sum(stats[1:], stats[0])

    # -------------------------------------------------------------- figures
    @property
    def n_experts(self) -> int:
        return len(self.costs)

    @property
    def n_tokens(self) -> int:
        return int(self._sums[0])

    def _mean(self, index: int) -> float:
        values = self._sums.tolist()
        return values[index] / max(values[0], 1.0)

    @property
    def expert_fractions(self) -> list[float]:
        return [self._mean(1 + i) for i in range(self.n_experts)]

    @property
    def entropy(self) -> float:
        return self._mean(1 + self.n_experts)

    @property
    def expected_cost(self) -> float:
        return self._mean(2 + self.n_experts)

    @property
    def projected_cost(self) -> float:
        return self._mean(3 + self.n_experts)

    @property
    def collapsed_fraction(self) -> float:
        return self._mean(4 + self.n_experts)

    @property
    def mean_uncertainty(self) -> float:
        return self._mean(5 + self.n_experts)

    def to_dict(self) -> dict:
        names = ("n_tokens", "expert_fractions", "entropy", "expected_cost", "projected_cost", "collapsed_fraction",
                 "mean_uncertainty", "costs")
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        fractions = " | ".join(f"E{i + 1}={f:.2f}" for i, f in enumerate(self.expert_fractions))
        return f"RoutingStats({fractions} entropy={self.entropy:.2f} cost={self.projected_cost:.2f})"
