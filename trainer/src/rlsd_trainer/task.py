"""The embedded default: a synthetic verifiable reasoning task and a tiny model built for it.

Task: evaluate a chain of single-digit additions and subtractions, e.g. "Compute 3+5-2+7.", whose
reference solution writes the running total step by step and ends in `\\boxed{13}`. Rows carry
that reference solution, so the teacher has real privileged information. The model is a Qwen3-
architecture causal LM a few hundred thousand parameters big, with a byte-level BPE tokenizer
trained here with the `tokenizers` library and a ChatML chat template; everything is written in
Hugging Face format, so the rest of the trainer treats it like any downloaded model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

from rlsd_contracts.config import DEFAULT_TEACHER_TEMPLATE, EmbeddedTaskSection
from rlsd_trainer.data import Example

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPLIT_SEEDS = {"train": 11, "eval": 23}


def make_problem(rng: random.Random, task: EmbeddedTaskSection) -> Example:
    terms = rng.randint(task.min_terms, task.max_terms)
    operands = [rng.randint(1, task.max_operand) for _ in range(terms)]
    signs = [rng.choice("+-") for _ in range(terms - 1)]
    question = f"Compute {operands[0]}" + "".join(f"{s}{x}" for s, x in zip(signs, operands[1:], strict=True))
    total, steps = operands[0], []
    for sign, operand in zip(signs, operands[1:], strict=True):
        new_total = total + operand if sign == "+" else total - operand
        steps.append(f"{total}{sign}{operand}={new_total}")
        total = new_total
    reference = ", ".join(steps) + f". Answer: \\boxed{{{total}}}"
    return Example(question=question + ".", answer=str(total), reference=reference, location="")


def generate_examples(task: EmbeddedTaskSection, split: str, seed: int) -> list[Example]:
    """Deterministic rows of the synthetic task; eval rows never repeat a train question."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"embedded task has splits {sorted(SPLIT_SEEDS)}, not {split!r}")
    count = task.num_train if split == "train" else task.num_eval
    rng = random.Random(seed * 1_000_003 + SPLIT_SEEDS[split])
    held_out = set()
    if split == "train":
        held_out = {e.question for e in generate_examples(task, "eval", seed)}
    rows: list[Example] = []
    while len(rows) < count:
        problem = make_problem(rng, task)
        if problem.question in held_out:
            continue
        rows.append(
            Example(
                question=problem.question,
                answer=problem.answer,
                reference=problem.reference,
                location=f"embedded:{split}[{len(rows)}]",
            )
        )
    return rows


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
