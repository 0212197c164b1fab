"""Attention experts: the base classes, the registry and the built-ins (imported to register them)."""

from .base import AttentionExpert, HeadAttentionExpert
from .full import FullAttention
from .hybrid import HybridAttention
from .linear import ELUFeatureMap, HedgehogFeatureMap, LinearAttention
from .local import LocalAttention
from .registry import build_expert, list_experts, register_expert

__all__ = [
    "AttentionExpert",
    "HeadAttentionExpert",
    "FullAttention",
    "HybridAttention",
    "LinearAttention",
    "LocalAttention",
    "ELUFeatureMap",
    "HedgehogFeatureMap",
    "build_expert",
    "list_experts",
    "register_expert",
]
