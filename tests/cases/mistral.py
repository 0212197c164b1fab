import torch
from transformers import MistralConfig, MistralForCausalLM

from arch_cases import ArchCase


def make(attn_implementation, **extra):
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn_implementation, **extra,
    )
    return MistralForCausalLM(config).eval()


CASES = [
    ArchCase("mistral-gqa", lambda impl: make(impl, sliding_window=None)),
    # A window shorter than the 12-token test sequences (and than the 7-token prompt of the cached
    # decoding test), so the full expert's window and the sliding KV cache are really exercised.
    ArchCase("mistral-sliding-window", lambda impl: make(impl, sliding_window=5)),
]
