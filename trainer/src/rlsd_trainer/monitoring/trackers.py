"""Experiment trackers: Weights & Biases, MLflow and TensorBoard (`metrics.trackers`, any subset).

Each gets the same per-step values as `metrics.jsonl` and Prometheus, and the resolved config once.
The libraries are optional extras (`pip install 'rlsd-trainer[wandb]'`, `[mlflow]`, `[tensorboard]`),
imported only when their tracker is configured; credentials come from the environment as each
library reads it (`WANDB_API_KEY`, `MLFLOW_TRACKING_TOKEN` / `_USERNAME` / `_PASSWORD`), which the
operator fills from a Secret. A run that resumes from a checkpoint logs into the same W&B and MLflow
run: their ids are kept in `<output_dir>/trackers.json`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from rlsd_contracts.config import ConfigError, RunConfig

# tracker name -> the module it needs (the extra of the same name installs it)
REQUIRES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the config as the flat parameters MLflow takes."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class WandbTracker:
    def __init__(self, config: RunConfig, resolved: dict[str, Any], run_id: str | None) -> None:
        import wandb

        settings = config.metrics.wandb
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=config.run.name,
            id=run_id,
            resume="allow",
            mode=settings.mode,
            dir=str(config.output_dir),
            config=resolved,
        )
        self.run_id: str = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        # W&B refuses steps below its current one: the steps a resumed run repeats (those since its
        # checkpoint) keep the values first logged.
        if step >= self.run.step:
            self.run.log(_finite(values), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, config: RunConfig, resolved: dict[str, Any], run_id: str | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        settings = config.metrics.mlflow
        uri = settings.tracking_uri
        if uri is None:
            # The default: MLflow's file store in the run directory (mlflow-skinny has no database
            # backend); MLflow 3 asks for an explicit opt-in to it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (config.output_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
            )
            run = self.client.create_run(experiment_id, run_name=config.run.name)
            run_id = run.info.run_id
            params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in flatten(resolved).items()}
            keys = sorted(params)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=[Param(k, params[k]) for k in keys[i : i + 100]])
            self.client.log_dict(run_id, resolved, "config.json")
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self._metric = Metric

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(key, value, now, step) for key, value in _finite(values).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TensorBoardTracker:
    def __init__(self, config: RunConfig, resolved: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = config.metrics.tensorboard.log_dir or str(config.output_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=log_dir)
        self.writer.add_text("config", "```json\n" + json.dumps(resolved, indent=2) + "\n```")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in _finite(values).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_installed(names: list[str]) -> None:
    """Fails at start-up, naming the extra to install, when a configured tracker's library is missing."""
    for name in names:
        if importlib.util.find_spec(REQUIRES[name]) is None:
            raise ConfigError(
                f"metrics.trackers: {name!r} needs the {REQUIRES[name]!r} package; "
                f"install it with pip install 'rlsd-trainer[{name}]' or remove {name!r}"
            )


def build_trackers(config: RunConfig) -> list[Tracker]:
    """The configured trackers, started; their run ids saved so that a resumed run logs into the same."""
    names = list(config.metrics.trackers)
    if not names:
        return []
    check_installed(names)
    resolved = config.model_dump(mode="json")
    ids_path = Path(config.output_dir) / IDS_FILE
    ids: dict[str, str] = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    trackers: list[Tracker] = []
    for name in names:
        if name == "wandb":
            tracker: Any = WandbTracker(config, resolved, ids.get(name))
        elif name == "mlflow":
            tracker = MlflowTracker(config, resolved, ids.get(name))
        else:
            tracker = TensorBoardTracker(config, resolved)
        if hasattr(tracker, "run_id"):
            ids[name] = tracker.run_id
        trackers.append(tracker)
    ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return trackers
