"""The SIGTERM-to-checkpoint preemption path, the learner pod's exit code, and how a training
process ends.

What each exit code means, and what the operator does about it, is the contract in
`rlsd_contracts.exit_codes`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import NoReturn

from rlsd_contracts.exit_codes import (
    EXIT_BAD_CONFIG,
    EXIT_FAILED,
    EXIT_FINISHED,
    EXIT_PREEMPTED,
    EXIT_PREEMPTED_UNSAVED,
)
from rlsd_contracts.wire import TERMINATION_LOG_ENV, TERMINATION_LOG_MAX_BYTES

log = logging.getLogger(__name__)

STATUS_DIR_ENV = "RLSD_EXIT_STATUS_DIR"


def record_exit(code: int) -> None:
    """Leave this rank's exit code where the `learner` launcher looks (torchrun's own exit code
    cannot tell a preempted worker from a failed one)."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if directory:
        path = os.path.join(directory, f"rank-{os.environ.get('RANK', '0')}")
        with open(path, "w") as handle:
            handle.write(str(code))


def end_process(code: int) -> NoReturn:
    """Exit with `code` now, without finalizing the interpreter: how a training process ends (`rlsd-trainer
    learner`, each of its ranks, and `local`), once its work is saved and its exit code recorded.

    Why not a plain return from `main`: torch's native threads outlive `destroy_process_group` (gloo's
    collective workers `pt_gloo_runloop`, NCCL's watchdog), since FSDP2's modules and DTensor's
    caches keep the groups alive to the end. Such a worker lets go of a finished collective (and
    its tensors) only after it has woken the rank waiting for it; a tensor whose Python object the
    work kept alive needs the GIL for that. If the interpreter is finalizing by then, CPython ends
    the worker with pthread_exit, whose unwinding reaches the work's noexcept destructor:
    std::terminate ("terminate called without an active exception"), SIGABRT, exit 134 after the
    last step, which the operator must read as a failed learner. No barrier closes that window (a
    barrier's work holds the works before it, and is let go of in the same way).

    What finalization would do that matters runs first, while every thread may still take the GIL:
    the atexit handlers (logging's flush, the experiment trackers' uploads, stopping multiprocessing
    children), then stdout and stderr are flushed. The rank's own threads are done by then (the
    planner's worker is joined when the run closes, asynchronous checkpoints are waited for).
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def report_error(message: str) -> None:
    """`error: <message>` on stderr and, in a pod, in its termination log (RLSD_TERMINATION_LOG), which
    the operator copies into the run's status; the first lines are kept when it is too long."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    data = message.encode()[:TERMINATION_LOG_MAX_BYTES].decode(errors="ignore")
    try:
        with open(path, "w") as handle:
            handle.write(data)
    except OSError as exc:
        log.warning("could not write the termination log %s: %s", path, exc)


def launcher_exit_code(torchrun_code: int, worker_codes: list[int], terminated: bool) -> int:
    """The learner pod's exit code from torchrun's, the workers' recorded ones, and whether the pod
    was sent SIGTERM (a rank that had not yet started, or died of the signal, saved nothing)."""
    if torchrun_code == EXIT_FINISHED:
        return EXIT_FINISHED
    if EXIT_BAD_CONFIG in worker_codes:
        return EXIT_BAD_CONFIG
    if worker_codes and set(worker_codes) == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED
    return EXIT_PREEMPTED_UNSAVED if terminated else EXIT_FAILED


class Preempted(Exception):
    """Raised at a step boundary after SIGTERM, once the checkpoint of that step is committed."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted at step {step}; checkpoint saved")
        self.step = step


class PreemptionWatch:
    """Turns SIGTERM into a flag the loop checks at step boundaries, with a deadline.

    If the loop has not saved and exited `grace_s` seconds after the first signal, the process
    exits with `EXIT_PREEMPTED_UNSAVED`; checkpoints are atomic, so the previous one stays valid.
    """

    def __init__(self, grace_s: float = 120.0) -> None:
        self.grace_s = grace_s
        self.requested = threading.Event()
        self._deadline: threading.Timer | None = None

    def install(self) -> PreemptionWatch:
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            return
        self.requested.set()
        log.warning("SIGTERM: stopping after this step to save a checkpoint (grace %.0f s)", self.grace_s)
        self._deadline = threading.Timer(self.grace_s, self._give_up)
        self._deadline.daemon = True
        self._deadline.start()

    def _give_up(self) -> None:
        log.error("grace period of %.0f s over before a checkpoint was saved; exiting", self.grace_s)
        record_exit(EXIT_PREEMPTED_UNSAVED)
        logging.shutdown()
        os._exit(EXIT_PREEMPTED_UNSAVED)


_process_watch: PreemptionWatch | None = None


def watch_for_preemption() -> PreemptionWatch:
    """This process's SIGTERM watch, installed on first use. A learner rank calls it first thing
    (see `__main__`), so a pod deleted while the rank still imports torch is not lost."""
    global _process_watch
    if _process_watch is None:
        _process_watch = PreemptionWatch().install()
    return _process_watch


def child_pids(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children
