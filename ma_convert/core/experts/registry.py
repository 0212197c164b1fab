"""Expert registry: ``@register_expert("name")`` on a class, ``build_expert("name", cfg)`` to make one."""

from __future__ import annotations

from typing import Callable, Type

from ..config import MetaAttnConfig
from .base import AttentionExpert

_EXPERTS: dict[str, Type[AttentionExpert]] = {}


def register_expert(name: str) -> Callable[[Type[AttentionExpert]], Type[AttentionExpert]]:
    """Class decorator that makes an :class:`AttentionExpert` buildable by name."""

    def decorate(cls: Type[AttentionExpert]) -> Type[AttentionExpert]:
        if not (isinstance(cls, type) and issubclass(cls, AttentionExpert)):
            raise TypeError(f"@register_expert({name!r}) needs an AttentionExpert subclass, got {cls!r}")
        existing = _EXPERTS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"expert name {name!r} is already registered to {existing.__qualname__}")
        _EXPERTS[name] = cls
        cls.name = name
        return cls

    return decorate


def build_expert(name: str, cfg: MetaAttnConfig) -> AttentionExpert:
    """Instantiate the expert registered under `name` for `cfg`."""
    if name not in _EXPERTS:
        raise ValueError(f"unknown expert {name!r}; registered experts: {list_experts()}")
    return _EXPERTS[name](cfg)


def list_experts() -> list[str]:
    return sorted(_EXPERTS)
