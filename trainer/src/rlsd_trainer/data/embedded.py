"""The embedded default task: a synthetic verifiable reasoning task.

Task: evaluate a chain of single-digit additions and subtractions, e.g. "Compute 3+5-2+7.", whose
reference solution writes the running total step by step and ends in `\\boxed{13}`. Rows carry
that reference solution, so the teacher has real privileged information. The tiny model built for
it is in `rlsd_trainer.model.embedded`.
"""

from __future__ import annotations

import random

from rlsd_contracts.config import EmbeddedTaskSection
from rlsd_trainer.data.example import Example

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
