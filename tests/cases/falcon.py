import torch
from transformers import FalconConfig, FalconForCausalLM

from arch_cases import ArchCase


def make(attn_implementation, **extra):
    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, attn_implementation=attn_implementation, **extra,
    )
    return FalconForCausalLM(config).eval()


CASES = [
    # Falcon-7B: one shared key/value head, RoPE, parallel attention + MLP.
    ArchCase("falcon-7b-multi-query", lambda impl: make(impl, multi_query=True, new_decoder_architecture=False)),
    # Falcon-40B: fused qkv laid out per kv group, two layer norms per block.
    ArchCase("falcon-40b-grouped-kv", lambda impl: make(impl, new_decoder_architecture=True, num_kv_heads=2, bias=True)),
    # Falcon-RW: ALiBi, full multi-head. Transformers' eager ALiBi path adds ALiBi twice (once
    # itself, once through the mask the model folds it into), so only SDPA is a reference.
    ArchCase("falcon-rw-alibi-parallel", lambda impl: make(
        impl, alibi=True, multi_query=False, parallel_attn=True, bias=True,
    ), eager_is_reference=False),
    ArchCase("falcon-rw-alibi-sequential", lambda impl: make(
        impl, alibi=True, multi_query=False, parallel_attn=False, bias=True,
    ), eager_is_reference=False),
]
