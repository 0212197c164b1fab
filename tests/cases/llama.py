import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arch_cases import ArchCase


def make(attn_implementation, **extra):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn_implementation, **extra,
    )
    return LlamaForCausalLM(config).eval()


CASES = [
    ArchCase("llama-gqa", make),
    ArchCase("llama-rope-scaling-tied", lambda impl: make(
        impl, tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    )),
]
