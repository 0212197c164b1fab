import torch
from transformers import Phi3Config, Phi3ForCausalLM

from arch_cases import ArchCase


def make(attn_implementation, **extra):
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
        # Phi-3's default pad/eos ids (32000) lie outside a tiny vocabulary.
        pad_token_id=0, eos_token_id=2, bos_token_id=1, attn_implementation=attn_implementation, **extra,
    )
    return Phi3ForCausalLM(config).eval()


CASES = [
    # GQA, and RoPE on half of each head (the other half passes through unrotated).
    ArchCase("phi3-gqa-partial-rotary", lambda impl: make(
        impl, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    )),
    # Phi-3 can also have a sliding window (kept by the full expert), here with tied embeddings.
    ArchCase("phi3-sliding-window-tied", lambda impl: make(impl, sliding_window=5, tie_word_embeddings=True)),
]
