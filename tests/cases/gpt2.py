import torch
from transformers import GPT2Config, GPT2LMHeadModel

from arch_cases import ArchCase


def make(attn_implementation, **extra):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256,
        attn_implementation=attn_implementation, **extra,
    )
    return GPT2LMHeadModel(config).eval()


CASES = [
    ArchCase("gpt2", make),
    # Per-layer 1/(layer_idx+1) score scaling, and the eager path's fp32 reordered attention.
    ArchCase("gpt2-inverse-layer-scale-upcast", lambda impl: make(
        impl, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True
    )),
]
