"""A tiny random Qwen3 causal LM shared by the tests that need a real transformers model."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

VOCAB = 97
PAD, EOS = 0, 1


def tiny_model(seed: int = 0, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """`tiny_model(seed)` in Hugging Face format with a word-level tokenizer (`t<id>`; pad t0, EOS t1)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=f"t{EOS}", pad_token=f"t{PAD}", unk_token="t2"
    ).save_pretrained(directory)
    tiny_model(seed=seed).save_pretrained(directory)
    return directory
