"""ma_convert: convert Hugging Face causal LMs to Meta-Attention (per-token routed attention).

Public API::

    from ma_convert import MetaAttnConfig, MetaAttentionLayer, force_expert
    layer = MetaAttentionLayer(MetaAttnConfig(d_model=512, n_heads=8))
    out, aux_loss, stats = layer(x)
"""

from .adapters import register_auto_classes
from .convert import convert
from .core import (
    AttentionExpert,
    FullAttention,
    LinearAttention,
    LocalAttention,
    MetaAttention,
    MetaAttentionLayer,
    MetaAttnConfig,
    ObjectiveWeights,
    RoutingPolicy,
    RoutingStats,
    build_expert,
    collect_aux_losses,
    cosine_ramp,
    force_expert,
    linear_ramp,
    list_experts,
    patch_module,
    register_expert,
    routing_policy,
    routing_stats,
    set_objective_weights,
    set_routing_mode,
    set_routing_policy,
)
from .version import __version__

register_auto_classes()

__all__ = [
    "AttentionExpert",
    "FullAttention",
    "LinearAttention",
    "LocalAttention",
    "MetaAttention",
    "MetaAttentionLayer",
    "MetaAttnConfig",
    "ObjectiveWeights",
    "RoutingPolicy",
    "RoutingStats",
    "build_expert",
    "collect_aux_losses",
    "convert",
    "cosine_ramp",
    "force_expert",
    "linear_ramp",
    "list_experts",
    "patch_module",
    "register_expert",
    "routing_policy",
    "routing_stats",
    "set_objective_weights",
    "set_routing_mode",
    "set_routing_policy",
    "__version__",
]
