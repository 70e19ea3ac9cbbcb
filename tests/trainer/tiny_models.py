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


def padded_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded reference path: `prompt + response` rows right-padded to the longest, one ordinary
    forward with a padding mask, full logits. Log-probs and entropies `[R, T]` of every response
    token (0 on padding), differentiable."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(map(len, rows))
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    log_probs = model(input_ids=input_ids, attention_mask=attention_mask).logits.log_softmax(-1)
    shape = (len(rows), max(map(len, responses)))
    logprobs = torch.zeros(shape, dtype=log_probs.dtype)
    entropy = torch.zeros(shape, dtype=log_probs.dtype)
    for b, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        for t, token in enumerate(response):
            position = len(prompt) + t - 1  # the hidden state before response token t predicts it
            logprobs[b, t] = log_probs[b, position, token]
            entropy[b, t] = -(log_probs[b, position].exp() * log_probs[b, position]).sum()
    return logprobs, entropy


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
