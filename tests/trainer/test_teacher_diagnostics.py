"""The teacher's diagnostics end to end: the planner's first wrong token of each response on the
embedded task (real tokenizer, real run), plans from older checkpoints, and the metrics a short RLSD
run logs (`delta_mean_positive`, ..., `delta_after_error`)."""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import pytest
from test_local_run import records, tiny_config

from rlsd_contracts.config import EmbeddedTaskSection, parse_config
from rlsd_trainer.algorithms import first_divergence
from rlsd_trainer.data.embedded import make_problem
from rlsd_trainer.model.embedded import build_tokenizer
from rlsd_trainer.rewards.verifiers import math_match
from rlsd_trainer.training.plan import StepPlan
from rlsd_trainer.training.trainer import Trainer
from rlsd_trainer.training.warmup import target_ids

NEW_KEYS = (
    "delta_mean_positive",
    "delta_mean_negative",
    "weight_mean_positive",
    "weight_mean_negative",
    "delta_correct",
    "delta_before_error",
    "delta_first_error",
    "delta_after_error",
    "advantage_shift",
)


def test_a_wrong_answer_leaves_the_reference_at_its_first_digit() -> None:
    """With the embedded tokenizer: a response with the reference's steps and another final answer
    leaves it at the answer's first digit (digits are single tokens); one that ends after the steps
    leaves it at its EOS; one cut off mid-way never leaves it."""
    task = EmbeddedTaskSection(min_terms=3, max_terms=3)
    tokenizer = build_tokenizer(task, seed=0)
    example = make_problem(random.Random(5), task)
    solution = target_ids(tokenizer, example.reference)
    assert solution[-1] == tokenizer.eos_token_id
    answer_at = example.reference.rindex("{") + 1
    wrong_answer = str(int(example.answer) + 1)
    wrong = target_ids(tokenizer, example.reference[:answer_at] + wrong_answer + "}")
    expected = len(tokenizer(example.reference[:answer_at], add_special_tokens=False)["input_ids"])
    assert wrong[:expected] == solution[:expected] and wrong[expected] != solution[expected]
    assert first_divergence(wrong, solution) == expected

    steps = example.reference[: example.reference.index(".")]
    stops_early = target_ids(tokenizer, steps)
    assert first_divergence(stops_early, solution) == len(stops_early) - 1  # its EOS
    assert first_divergence(solution[:5], solution) == 5


def test_a_plan_from_an_older_checkpoint_has_no_first_errors() -> None:
    """Plans generated ahead go into checkpoints (pickled); one written before the field existed
    loads with it None, so the learner logs no error split for it."""
    plan = StepPlan(
        step=0, prompts=[[1]], responses=[[2, 3]], rollout_logprobs=[[0.0, 0.0]], policy_versions=[0],
        advantages=[0.0], teacher_prompts=None, teacher_logprobs=None, first_error_tokens=[1],
    )  # fmt: skip
    del plan.first_error_tokens  # what an older trainer pickled: no such attribute
    assert pickle.loads(pickle.dumps(plan)).first_error_tokens is None


@pytest.mark.slow
def test_an_rlsd_run_locates_first_errors_and_logs_the_teacher_diagnostics(tmp_path: Path) -> None:
    """A warmed-up tiny policy, two RLSD steps: every response's first wrong token is where it
    leaves its reference solution (plus EOS, as the warm-up tokenizes it), -1 exactly for the
    verifier's correct ones; and every step logs every diagnostic, each finite in some step."""
    config = tiny_config(tmp_path, total_steps=2)
    config["warmup"].update(steps=60, lr=3e-3)  # responses that follow the reference for a while
    trainer = Trainer(parse_config(config))
    assert trainer.plans is not None
    planner = trainer.plans.planner
    plans: list[StepPlan] = []
    make_plan = planner.plan

    def recording(step: int) -> StepPlan:
        plans.append(make_plan(step))
        return plans[-1]

    planner.plan = recording  # type: ignore[method-assign]
    trainer.run()

    by_prompt = {tuple(planner.prompt_ids(e.question)): e for e in planner.train_set}
    tokenizer = trainer.tokenizer
    group = config["algorithm"]["group_size"]
    located = []
    for plan in plans:
        assert plan.first_error_tokens is not None
        assert len(plan.first_error_tokens) == len(plan.responses)
        for index, (response, error) in enumerate(zip(plan.responses, plan.first_error_tokens, strict=True)):
            example = by_prompt[tuple(plan.prompts[index // group])]
            correct = math_match(tokenizer.decode(response, skip_special_tokens=True), example.answer) >= 1.0
            assert (error == -1) == correct
            if correct:
                continue
            solution = target_ids(tokenizer, example.reference)
            assert response[:error] == solution[:error]
            assert error == len(response) or error == len(solution) or response[error] != solution[error]
            located.append(error)
    assert any(error > 0 for error in located)  # some responses follow the reference a while

    steps = [r for r in records(tmp_path) if "policy_loss" in r]
    assert len(steps) == 2
    for key in NEW_KEYS:
        assert all(key in record for record in steps), key
        assert any(math.isfinite(record[key]) for record in steps), key
