"""Loading a Hugging Face causal LM and its tokenizer, and turning questions into prompt ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlsd_contracts.config import ModelSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    stop_token_ids: tuple[int, ...]


def load_model(path: str | Path, section: ModelSection) -> LoadedModel:
    """Load weights and tokenizer from a directory or hub id (the hub only where the network allows)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=section.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=DTYPES[section.dtype], trust_remote_code=section.trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's EOS list."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    if not ids:
        raise ValueError("the model has no EOS token: set eos_token_id in its tokenizer or generation config")
    return tuple(sorted(ids))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids for one user turn: the chat template when the tokenizer has one, plain text otherwise."""
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; older versions a plain list.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return tokenizer(text, add_special_tokens=True)["input_ids"]
