"""The tiny model built for the embedded task (`rlsd_trainer.data.embedded`).

A Qwen3-architecture causal LM a few hundred thousand parameters big, with a byte-level BPE
tokenizer trained here with the `tokenizers` library on the task's text and a ChatML chat template;
everything is written in Hugging Face format, so the rest of the trainer treats it like any
downloaded model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

from rlsd_contracts.config import DEFAULT_TEACHER_TEMPLATE, EmbeddedTaskSection
from rlsd_trainer.data.embedded import make_problem

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tokenizer_corpus(task: EmbeddedTaskSection, seed: int) -> list[str]:
    rng = random.Random(seed)
    corpus = [DEFAULT_TEACHER_TEMPLATE]
    for _ in range(2000):
        problem = make_problem(rng, task)
        corpus += [problem.question, problem.reference]
    return corpus


def build_tokenizer(task: EmbeddedTaskSection, seed: int, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task's text; digits stay single tokens so arithmetic is per digit."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(task, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model_dir(directory: Path, task: EmbeddedTaskSection, seed: int) -> Path:
    """Write a freshly initialised tiny model + tokenizer in Hugging Face format to `directory`."""
    tokenizer = build_tokenizer(task, seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
