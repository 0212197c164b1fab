"""Which parameters train: the routers and the experts, nothing else."""

from __future__ import annotations

import torch.nn as nn

META_MARK = ".meta."  # every router and expert parameter lives under an attention module's `meta`
LORA_MARK = "lora_"  # peft's LoRA matrices


def freeze_all_but_routers_and_experts(model: nn.Module) -> None:
    """Set requires_grad on router and expert parameters only."""
    for name, param in model.named_parameters():
        param.requires_grad_(META_MARK in name)
    assert_only_routers_and_experts_train(model)


def add_lora(model: nn.Module, targets: str, rank: int, alpha: int) -> nn.Module:
    """Wrap `model` with peft LoRA on the attention projections matching `targets`; the routers and
    experts stay trainable beside the LoRA matrices."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    for name, param in wrapped.named_parameters():
        if META_MARK in name:
            param.requires_grad_(True)
    assert_only_routers_and_experts_train(wrapped, lora=True)
    return wrapped


def assert_only_routers_and_experts_train(model: nn.Module, lora: bool = False) -> None:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    offenders = [n for n in trainable if META_MARK not in n and not (lora and LORA_MARK in n)]
    if offenders:
        raise AssertionError(f"only router and expert parameters may train, but these would too: {offenders[:5]}")
    if not trainable:
        raise AssertionError("no router or expert parameter is trainable: is the model converted?")
