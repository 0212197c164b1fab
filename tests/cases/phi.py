import torch
from transformers import PhiConfig, PhiForCausalLM

from arch_cases import ArchCase


def make(attn_implementation, partial_rotary_factor=0.5, **extra):
    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn_implementation,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor},
        **extra,
    )
    model = PhiForCausalLM(config).eval()
    # Initialisation leaves biases at 0 and LayerNorms at identity; perturb them so the q/k/v biases
    # and the q/k LayerNorm affine parameters actually take part in what the tests compare.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


CASES = [
    ArchCase("phi-partial-rotary", make),
    # q/k LayerNorm, a rotary part that is not half the head (6 of 16 dims), tied embeddings.
    ArchCase("phi-qk-layernorm", lambda impl: make(
        impl, partial_rotary_factor=0.4, qk_layernorm=True, tie_word_embeddings=True,
    )),
]
