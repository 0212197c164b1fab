"""The Meta-Attention core: torch only, no transformers import."""
# ruff: noqa: F401  (re-exports)

from .config import MetaAttnConfig
from .control import (
    collect_aux_losses,
    force_expert,
    routing_policy,
    routing_stats,
    set_objective_weights,
    set_routing_mode,
    set_routing_policy,
)
from .experts import (
    AttentionExpert,
    FullAttention,
    LinearAttention,
    LocalAttention,
    build_expert,
    list_experts,
    register_expert,
)
from .generic import patch_module
from .layer import MetaAttentionLayer
from .meta_attention import MetaAttention
from .objective import ObjectiveWeights, cosine_ramp, linear_ramp
from .policy import RoutingPolicy
from .stats import RoutingStats
