"""Learner sharding: FSDP2 over 2 gloo ranks computes the gradient of the single-process loss, the
rank shares and exit-code rules, and activation checkpointing leaves gradients unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import TESTS_DIR, one_thread_env, torchrun

from rlsd_contracts.config import LearnerSection
from rlsd_contracts.exit_codes import (
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_FINISHED,
    EXIT_PREEMPTED,
    EXIT_PREEMPTED_UNSAVED,
)
from rlsd_trainer.lifecycle import launcher_exit_code
from rlsd_trainer.training.distributed import DistContext, prepare_policy, share_of

# Builds a fixed batch of 3 groups (a prompt and 2 responses each; the prompt packed once per group),
# takes this rank's groups, and writes the full gradient of
#   loss = sum over this rank's response tokens of -logprob * advantage / (global token count)
# summed over ranks (FSDP2 reduce-scatter), to compare with one process doing all rows.
WORKER = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from tiny_models import tiny_model
from rlsd_trainer.algorithms import token_mean
from rlsd_contracts.config import LearnerSection
from rlsd_trainer.lifecycle import end_process
from rlsd_trainer.training.distributed import (
    all_reduce,
    barrier,
    full_parameters,
    init_distributed,
    prepare_policy,
    share_of,
    shutdown_distributed,
)
from rlsd_trainer.model.logprobs import pack

ctx = init_distributed(60)
generator = torch.Generator().manual_seed(0)
prompts = [torch.randint(2, 97, (int(n),), generator=generator).tolist() for n in (3, 5, 4)]
responses = [torch.randint(2, 97, (int(n),), generator=generator).tolist() for n in (4, 1, 6, 3, 5, 2)]
advantages = torch.randn(6, generator=generator)
groups = share_of(3, ctx)
rows = range(2 * groups.start, 2 * groups.stop)
batch = pack(
    prompts[groups.start : groups.stop], [responses[i] for i in rows], [i // 2 - groups.start for i in rows]
)
(global_tokens,) = all_reduce([float(batch.response_mask.sum())], ctx)
policy = prepare_policy(tiny_model(seed=1), ctx, LearnerSection())
logprobs, _ = policy.response_logprobs(batch, chunk_tokens=4)
loss = token_mean(-logprobs * advantages[list(rows)].unsqueeze(1), batch.response_mask, global_tokens)
loss.backward()
grads = {}
for (name, param) in policy.named_parameters():
    grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
    grads[name] = grad.clone()
if ctx.rank == 0:
    torch.save(grads, sys.argv[1])
# As a learner rank ends (rlsd_trainer.cli): no rank tears its groups down while a peer still uses
# them, and the process ends without finalizing the interpreter while gloo's threads run (a rank
# otherwise aborts at exit now and then: see rlsd_trainer.lifecycle.end_process).
barrier(ctx)
shutdown_distributed()
end_process(0)
"""


def _run(tmp_path: Path, nproc: int) -> dict[str, torch.Tensor]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"grads-{nproc}.pt"
    if nproc == 1:
        command = [sys.executable, str(script), str(out), str(TESTS_DIR)]
        done = subprocess.run(command, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    else:
        done = torchrun(nproc, script, str(out), str(TESTS_DIR))
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
def test_two_fsdp_ranks_give_the_single_process_gradient(tmp_path: Path) -> None:
    single, sharded = _run(tmp_path, 1), _run(tmp_path, 2)
    assert single.keys() == sharded.keys()
    for name in single:
        assert single[name].abs().sum() > 0, name
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_keeps_gradients() -> None:
    from tiny_models import tiny_model

    from rlsd_trainer.model.logprobs import pack

    batch = pack([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]])
    grads = []
    for checkpointing in (False, True):
        policy = prepare_policy(
            tiny_model(seed=2).train(), DistContext(), LearnerSection(activation_checkpointing=checkpointing)
        )
        # The name every supported transformers has (5.2x adds is_activation_checkpointing).
        assert policy.lm.is_gradient_checkpointing == checkpointing
        logprobs, _ = policy.response_logprobs(batch, chunk_tokens=4)
        logprobs.sum().backward()
        grads.append({name: p.grad.clone() for name, p in policy.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


END = r"""
import atexit, sys
from rlsd_trainer.lifecycle import end_process
atexit.register(lambda: open(sys.argv[1], "w").write("atexit handlers ran"))
sys.stdout.write("buffered, not flushed")  # stdout is a pipe: block-buffered
end_process(int(sys.argv[2]))
"""


@pytest.mark.parametrize("code", [0, 75])
def test_end_process_runs_the_exit_handlers_flushes_and_exits_with_the_code(
    tmp_path: Path, code: int
) -> None:
    marker = tmp_path / "marker"
    command = [sys.executable, "-c", END, str(marker), str(code)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stdout == "buffered, not flushed"
    assert marker.read_text() == "atexit handlers ran"


EVEN_SPLITS = [
    (6, 2, [range(0, 3), range(3, 6)]),
    (5, 2, [range(0, 3), range(3, 5)]),
    (3, 3, [range(0, 1), range(1, 2), range(2, 3)]),
]


@pytest.mark.parametrize(("count", "world", "expected"), EVEN_SPLITS)
def test_share_of_splits_contiguously_and_evenly(count: int, world: int, expected: list[range]) -> None:
    assert [share_of(count, DistContext(rank=r, world_size=world)) for r in range(world)] == expected


@pytest.mark.parametrize(
    ("torchrun", "workers", "terminated", "expected"),
    [
        (0, [0, 0], False, EXIT_FINISHED),
        (1, [75, 75], True, EXIT_PREEMPTED),
        (1, [75, 76], True, EXIT_PREEMPTED_UNSAVED),  # one rank could not save: the step is lost
        (1, [], True, EXIT_PREEMPTED_UNSAVED),  # signal before the ranks started
        (1, [3, 1], False, EXIT_BAD_CONFIG),
        (1, [1, 75], False, EXIT_FAILED),
        (1, [], False, EXIT_FAILED),  # a rank died without recording anything (OOM kill)
    ],
)
def test_launcher_exit_code(torchrun: int, workers: list[int], terminated: bool, expected: int) -> None:
    assert launcher_exit_code(torchrun, workers, terminated) == expected
