"""A tiny random Qwen3 causal LM shared by the tests that need a real transformers model."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

VOCAB = 97


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
