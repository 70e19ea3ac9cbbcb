"""Crash-safe checkpoints: written to a temporary directory, checksummed, then renamed into place.

Layout: `<dir>/step-00000020/{state.pt, manifest.json}`. A checkpoint counts only once its
directory has been atomically renamed from `*.tmp` and its manifest's SHA-256 sums match, so a
crash mid-write never leaves a half-written "latest"; a corrupted latest falls back to the one
before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STATE = "state.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int) -> None:
        self.directory = directory
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` for `step` atomically and prune all but the newest `keep_last`."""
        final = self.path_for(step)
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        torch.save(state, staging / STATE)
        manifest = {"step": step, "files": {STATE: _sha256(staging / STATE)}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for name in (STATE, MANIFEST):
            with (staging / name).open("rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        _fsync_dir(self.directory)
        self._prune()
        return final

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

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint whose checksums verify, or None when there is none."""
        for path in reversed(self.committed()):
            if self.verify(path):
                manifest = json.loads((path / MANIFEST).read_text())
                return int(manifest["step"]), torch.load(path / STATE, weights_only=False)
            log.warning("checkpoint %s failed verification; falling back to the previous one", path)
        return None

    def _prune(self) -> None:
        for path in self.committed()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
