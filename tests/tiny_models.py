"""Tiny checkpoints on disk for the command-line and training tests: a LLaMA folder with a word-level
tokenizer trained on CPython's documentation text, and a small GGUF file."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_tokenizer():
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(topics.values())[:50], trainers.WordLevelTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def save_tiny_llama(folder: Path, tokenizer: bool = True, **config) -> Path:
    """A tiny original (unconverted) LLaMA saved as a folder, with a tokenizer unless told otherwise."""
    torch.manual_seed(0)
    settings = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path) -> Path:
    """A small, well-formed GGUF file (a header, metadata and two tensors); enough for the checks that
    run before any weight is read."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
