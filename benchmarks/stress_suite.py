"""The whole test suite from clean clones under load: N runs of CI's own entry point in a row.

What it runs
    For each of `--runs` rounds, what CI runs on a fresh machine: a `git clone` of this repository at
    `--ref` (committed work only, as CI sees it) into a new directory, then `bash .ci/run` in it (the
    README's `make test`: ruff, pytest, and the vLLM conformance suite), while `--load` processes of
    `yes > /dev/null` keep that many cores busy, as another job sharing the machine would. The
    caches under `~/.cache/rlsd/` (tools, images, the vLLM venv) are shared, as on CI's machine, so a
    round after the first measures a warm run. It stops at the first red run (the target is N green
    in a row) unless `--keep-going`.

What it reports
    Each run's exit code, wall time, the summary line of every pytest session in its log
    (`735 passed, 2 warnings in 2037.46s`) and the tests that failed; the log is kept under `--logs`,
    a red run's clone is kept for its test directories. A table, and
    `benchmarks/results/<--name>.json`, rewritten after every round.

    make stress-suite RUNS=3 LOAD=1
    .venv/bin/python benchmarks/stress_suite.py --runs 1 --load 0 --ref HEAD~1
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import RESULTS, ROOT, busy_cores, environment, finish

# pytest -q's last line: "1 failed, 734 passed, 2 warnings in 2037.46s (0:33:57)".
_SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+(?:, )?)+) in ([\d.]+)s\b", re.MULTILINE)
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass
class SuiteRun:
    round: int
    commit: str
    code: int
    seconds: float
    sessions: list[dict[str, Any]] = field(default_factory=list)  # one per pytest session, in order
    failed_tests: list[str] = field(default_factory=list)
    log: str = ""
    clone: str = ""  # kept only for a red run

    @property
    def green(self) -> bool:
        return self.code == 0


def pytest_sessions(log: str) -> list[dict[str, Any]]:
    """Every pytest summary line of a log: its outcome counts and seconds."""
    sessions = []
    for counts, seconds in _SUMMARY.findall(log):
        outcomes = {word: int(number) for number, word in (part.split(" ") for part in counts.split(", "))}
        sessions.append({"outcomes": outcomes, "seconds": float(seconds)})
    return sessions


def resolve(ref: str) -> str:
    """The commit `ref` names in this repository (short form)."""
    command = ["git", "rev-parse", "--short", "--verify", f"{ref}^{{commit}}"]
    return subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run_once(round_: int, commit: str, logs: Path) -> SuiteRun:
    clone = Path(tempfile.mkdtemp(prefix="rlsd-suite-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    log_path = logs / f"run-{round_}.log"
    started = time.monotonic()
    with log_path.open("w") as sink:
        ci = subprocess.run(["bash", ".ci/run"], cwd=clone, stdout=sink, stderr=subprocess.STDOUT)
    code = ci.returncode
    run = SuiteRun(round_, commit, code, round(time.monotonic() - started, 1), log=str(log_path))
    text = log_path.read_text(errors="replace")
    run.sessions = pytest_sessions(text)
    run.failed_tests = _FAILED.findall(text)
    if run.green:
        shutil.rmtree(clone, ignore_errors=True)
    else:
        run.clone = str(clone)
    return run


def describe(run: SuiteRun) -> str:
    sessions = "; ".join(
        ", ".join(f"{n} {word}" for word, n in s["outcomes"].items()) + f" in {s['seconds']:.0f} s"
        for s in run.sessions
    )
    verdict = "green" if run.green else f"RED (exit {run.code}): {', '.join(run.failed_tests) or 'see log'}"
    return f"[{run.round}] {run.commit} {run.seconds:6.0f} s  {sessions or 'no pytest summary'}  {verdict}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="clean-clone runs of .ci/run")
    parser.add_argument("--load", type=int, default=1, help="cores kept busy by `yes > /dev/null` (0: none)")
    parser.add_argument("--ref", default="HEAD", help="the commit to clone (committed work only)")
    parser.add_argument("--keep-going", action="store_true", help="run every round, even after a red one")
    parser.add_argument("--logs", type=Path, default=ROOT / "runs/stress-suite", help="where the logs go")
    parser.add_argument("--name", default="stress_suite", help="results file name (without .json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": {**environment(), "load_cores": args.load},
    }
    commit = resolve(args.ref)
    report["commit"] = commit
    runs: list[SuiteRun] = []
    with busy_cores(args.load):
        for round_ in range(1, args.runs + 1):
            runs.append(run_once(round_, commit, args.logs))
            print(describe(runs[-1]), flush=True)
            # Written after every round: a stopped two-hour benchmark keeps the rounds it finished.
            report["runs"] = [asdict(run) for run in runs]
            report["green_in_a_row"] = next((i for i, run in enumerate(runs) if not run.green), len(runs))
            finish(report, RESULTS / f"{args.name}.json")
            if not runs[-1].green and not args.keep_going:
                break
    green_in_a_row = report["green_in_a_row"]
    print(f"\n{green_in_a_row} green run(s) in a row of {args.runs} asked, under {args.load} busy core(s)")
    return 0 if green_in_a_row == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
