"""The Meta-Attention core: torch only, no transformers import."""
# ruff: noqa: F401  (re-exports)

from .config import FORMAT_VERSION, MetaAttnConfig
from .control import (
    collect_aux_losses,
    force_expert,
    meta_attention_modules,
    routing_policy,
    routing_stats,
    set_objective_weights,
    set_routing_mode,
    set_routing_policy,
)
from .controller import DirichletRouter, RouterOutput, SoftmaxRouter, position_feature
from .experts import (
    AttentionExpert,
    FullAttention,
    HeadAttentionExpert,
    LinearAttention,
    LocalAttention,
    build_expert,
    list_experts,
    register_expert,
)
from .generic import MetaMultiheadAttention, patch_module
from .layer import MetaAttentionLayer
from .meta_attention import MetaAttention
from .objective import ObjectiveWeights, cosine_ramp, dirichlet_kl, linear_ramp, prior_concentration, prior_mean
from .policy import RoutingPolicy, split_saved_block
from .stats import RoutingStats
