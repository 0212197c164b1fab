"""Which parameters train: the routers and the experts, nothing else."""

from __future__ import annotations

import torch.nn as nn

META_MARK = ".meta."  # every router and expert parameter lives under an attention module's `meta`


def freeze_all_but_routers_and_experts(model: nn.Module) -> list[str]:
    """Set requires_grad on router and expert parameters only; returns their names."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(META_MARK in name)
        if META_MARK in name:
            names.append(name)
    assert_only_routers_and_experts_train(model)
    return names


def assert_only_routers_and_experts_train(model: nn.Module) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    offenders = [n for n in trainable if META_MARK not in n]
    if offenders:
        raise AssertionError(f"only router and expert parameters may train, but these would too: {offenders[:5]}")
    if not trainable:
        raise AssertionError("no router or expert parameter is trainable: is the model converted?")
