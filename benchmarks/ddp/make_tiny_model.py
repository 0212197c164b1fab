"""A random LLaMA-shaped model (~30M parameters) with a word-level tokenizer, built offline, for
multi-GPU recipe runs where no pretrained checkpoint can be carried."""

import sys

import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

folder = sys.argv[1]
tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(list(topics.values()), trainers.WordLevelTrainer(vocab_size=8192, special_tokens=["<unk>", "<eos>"]))
PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=1024)
LlamaForCausalLM(config).save_pretrained(folder)
print("saved", folder)
