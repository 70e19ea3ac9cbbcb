"""Supervised warm-up: teach the model the answer format before RL, on rows' reference solutions.

Loss: `-mean_t log pi(r_t | prompt, r_<t)` over the reference-solution tokens `r` (plus EOS). A
share of rows is shown in the teacher's privileged format (question + reference in the prompt), so
a model trained from scratch learns to read a reference, as a pretrained LLM already can. Another
share may be given only the bare final answer as target (`direct_answer_fraction`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlsd_contracts.config import WarmupSection
from rlsd_trainer.data.example import Example
from rlsd_trainer.model.loading import encode_prompt
from rlsd_trainer.model.logprobs import pack, response_logprobs
from rlsd_trainer.training.teacher import render_teacher_prompt


def direct_answer(answer: str) -> str:
    """The bare-answer target: the final line of a worked solution, with no steps before it."""
    return f"Answer: \\boxed{{{answer}}}"


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """The tokens the warm-up teaches for `target`: its text's tokens, then EOS."""
    return tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def supervised_warmup(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    config: WarmupSection,
    teacher_template: str,
    seed: int,
    chunk_tokens: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run `config.steps` AdamW steps of next-token loss on reference solutions; returns the losses."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / config.steps)
    )
    model.train()
    losses = []
    for step in range(config.steps):
        batch = rng.sample(examples, min(config.batch_size, len(examples)))
        prompts, targets = [], []
        for example in batch:
            reference = example.reference or example.answer
            text, target = example.question, reference
            if rng.random() < config.privileged_fraction:
                text = render_teacher_prompt(teacher_template, example.question, reference)
            elif rng.random() < config.direct_answer_fraction:
                target = direct_answer(example.answer)
            prompts.append(encode_prompt(tokenizer, text))
            targets.append(target_ids(tokenizer, target))
        packed = pack(prompts, targets)
        logprobs, _ = response_logprobs(model, packed, chunk_tokens)
        loss = -(logprobs * packed.response_mask).sum() / packed.response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
