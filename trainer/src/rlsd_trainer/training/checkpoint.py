"""Crash-safe sharded checkpoints with `torch.distributed.checkpoint` (DCP).

Layout of one checkpoint, `<dir>/step-00000020/`:
- the DCP files of the sharded state (model, optimizer, frozen teacher snapshot), written by every
  rank (`*.distcp`, `.metadata`); DCP reshards on load, so a run may resume on another rank count;
- `trainer.pt`: rank 0's loop state (scheduler, sampler position, lambda/teacher-sync state, ...);
- `rank-<r>.pt`: each rank's RNG states;
- `manifest.json`: the SHA-256 of every file above.

Everything is written into `step-N.tmp` first; rank 0 writes the manifest and renames the directory
into place only when every rank's writes are complete, so a crash at any moment never leaves a
half-written "latest". Loading verifies the sums and falls back to the previous checkpoint.
With `async_save`, DCP copies the state to host memory and writes it in a background thread; the
commit happens at a later step boundary once every rank's write has finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from rlsd_trainer.training.distributed import DistContext, all_reduce, barrier, broadcast_from_main

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Restored:
    step: int
    path: Path
    trainer_state: dict[str, Any]
    # None when this rank did not exist in the saved run (resumed on more ranks).
    rank_state: dict[str, Any] | None


@dataclass
class _Pending:
    step: int
    future: Future


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, ctx: DistContext, async_save: bool = False) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.ctx = ctx
        self.async_save = async_save
        self.pending: _Pending | None = None
        # Step of the newest committed checkpoint (0: none yet), reported as `rlsd_checkpoint_step`.
        self.committed_step = 0
        # Async writes run their collectives on a group of their own, apart from training's.
        self.group = dist.new_group(backend="gloo") if ctx.distributed and async_save else None

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    # ---- saving ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        sharded: dict[str, Any],
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        blocking: bool = False,
    ) -> Path | None:
        """Write checkpoint `step` (every rank calls this); its path once committed, or None while an
        asynchronous write is still pending."""
        self.wait()
        staging = self._staging(step)
        if self.ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier(self.ctx)
        torch.save(rank_state, staging / f"rank-{self.ctx.rank}.pt")
        if self.ctx.is_main:
            torch.save(trainer_state, staging / TRAINER_STATE)
        if self.async_save and not blocking:
            future = dcp.async_save(
                sharded, checkpoint_id=staging, process_group=self.group, no_dist=not self.ctx.distributed
            )
            self.pending = _Pending(step, future)  # type: ignore[arg-type]
            return None
        dcp.save(sharded, checkpoint_id=staging, no_dist=not self.ctx.distributed)
        return self._commit(step)

    def poll(self) -> Path | None:
        """At a step boundary: commit a finished asynchronous save (all ranks agree it is done)."""
        if self.pending is None:
            return None
        (unfinished,) = all_reduce([0.0 if self.pending.future.done() else 1.0], self.ctx, op="max")
        return self.wait() if unfinished == 0.0 else None

    def wait(self) -> Path | None:
        """Finish and commit the pending asynchronous save, if any."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        pending.future.result()
        return self._commit(pending.step)

    def _staging(self, step: int) -> Path:
        final = self.path_for(step)
        return final.with_name(final.name + ".tmp")

    def _commit(self, step: int) -> Path:
        final, staging = self.path_for(step), self._staging(step)
        barrier(self.ctx)
        if self.ctx.is_main:
            files = sorted(p for p in staging.iterdir() if p.is_file())
            for path in files:
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            manifest = {"step": step, "files": {p.name: _sha256(p) for p in files}}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync(staging / MANIFEST)
            _fsync(staging)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            _fsync(self.directory)
            self._prune()
        barrier(self.ctx)
        self.committed_step = step
        return final

    # ---- loading --------------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoint directories, oldest first (staging directories are ignored)."""
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))

    def verify(self, path: Path) -> bool:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            return all(_sha256(path / name) == digest for name, digest in manifest["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def latest_valid(self) -> Path | None:
        """The newest checkpoint whose checksums verify (rank 0 decides for all ranks)."""
        chosen = None
        if self.ctx.is_main:
            for path in reversed(self.committed()):
                if self.verify(path):
                    chosen = str(path)
                    break
                log.warning("checkpoint %s failed verification; falling back to the previous one", path)
        chosen = broadcast_from_main([chosen], self.ctx)[0]
        return Path(chosen) if chosen is not None else None

    def load_latest(self, sharded: dict[str, Any]) -> Restored | None:
        """Load the newest valid checkpoint into `sharded` in place; None when there is none."""
        path = self.latest_valid()
        if path is None:
            return None
        dcp.load(sharded, checkpoint_id=path, no_dist=not self.ctx.distributed)
        step = int(json.loads((path / MANIFEST).read_text())["step"])
        self.committed_step = step
        rank_file = path / f"rank-{self.ctx.rank}.pt"
        return Restored(
            step=step,
            path=path,
            trainer_state=torch.load(path / TRAINER_STATE, weights_only=False),
            rank_state=torch.load(rank_file, weights_only=False) if rank_file.exists() else None,
        )

    def _prune(self) -> None:
        for path in self.committed()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
