"""The experiment trackers (`metrics.trackers`) with the real libraries writing locally: W&B in offline
mode, an MLflow file store and TensorBoard event files, each read back with its library's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_local_run import records, tiny_config

from rlsd_contracts.config import ConfigError, parse_config
from rlsd_trainer.monitoring import trackers
from rlsd_trainer.training.trainer import run_training

pytestmark = pytest.mark.slow
TRACKED = ("reward_mean", "policy_loss", "lambda", "eval_accuracy")


def tracked_config(output: Path, total_steps: int) -> dict:
    config = tiny_config(output, total_steps)
    config["metrics"] |= {
        "trackers": ["wandb", "mlflow", "tensorboard"],
        "wandb": {"mode": "offline", "project": "rlsd-test"},
        "mlflow": {"experiment": "rlsd-test"},
    }
    return config


def series(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): r[key] for r in rows if key in r}


def wandb_records(path: Path) -> list:
    """The records of an offline run's `.wandb` file, as W&B's own protobuf messages. W&B ships no
    Python reader any more (its Go core writes them): the file is a 7-byte header (":W&B", 0xBEE1,
    version 0) then LevelDB's log format, 32 KiB blocks of chunks (CRC32C, length, type)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_trackers_log_every_step_and_the_config_and_resume_into_the_same_runs(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    run_training(parse_config(tracked_config(output, total_steps=2)))
    ids = json.loads((output / trackers.IDS_FILE).read_text())
    assert set(ids) == {"wandb", "mlflow"}
    # Resumed from its checkpoint (a preempted pod's next attempt): the same W&B and MLflow runs.
    run_training(parse_config(tracked_config(output, total_steps=3)))
    assert json.loads((output / trackers.IDS_FILE).read_text()) == ids
    jsonl = records(output)
    assert max(r["step"] for r in jsonl) == 3

    # MLflow: the file store's metric history is metrics.jsonl's, step for step; the config as params.
    client = MlflowClient(tracking_uri=(output / "mlruns").resolve().as_uri())
    for key in TRACKED:
        history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], key)}
        assert history == pytest.approx(series(jsonl, key)), key
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["algorithm.name"] == "rlsd"
    assert json.loads(mlflow_run.data.params["rollout.prompts_per_step"]) == 3
    assert len(client.search_runs([mlflow_run.info.experiment_id])) == 1

    # TensorBoard: scalars per step as logged (both processes' event files), and the config as text.
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    for key in TRACKED:
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(series(jsonl, key)), key
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("config/text_summary")]
    assert len(texts) == 2 and '"total_steps": 3' in texts[-1] and '"name": "rlsd"' in texts[-1]

    # W&B offline: one run file per process, both of the same run id, whose history records are
    # metrics.jsonl's steps (a resumed process logs only the steps past the ones already logged).
    files = sorted((output / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.stem for f in files} == {f"run-{ids['wandb']}"}
    history: dict[str, dict[int, float]] = {}
    configs = []
    for record in (r for f in files for r in wandb_records(f)):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                history.setdefault(key, {})[items["_step"]] = value
        elif record.WhichOneof("record_type") == "run":
            configs.append({i.key: json.loads(i.value_json) for i in record.run.config.update})
    for key in TRACKED:
        assert history[key] == pytest.approx(series(jsonl, key)), key
    assert len(configs) == 2, configs
    assert configs[-1]["algorithm"]["name"] == "rlsd" and configs[-1]["run"]["total_steps"] == 3, configs


def test_a_tracker_without_its_library_fails_at_start_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library is installed in the test venv; point the check at a module that is not.
    monkeypatch.setitem(trackers.REQUIRES, "wandb", "wandb_not_installed")
    config = parse_config(tracked_config(tmp_path, total_steps=1))
    with pytest.raises(ConfigError, match=r"pip install 'rlsd-trainer\[wandb\]'"):
        trackers.build_trackers(config)


@pytest.mark.parametrize(
    ("trackers_value", "message"),
    [
        (["wandb", "wandb"], "lists a tracker twice"),
        (["neptune"], "'wandb', 'mlflow' or 'tensorboard'"),
    ],
)
def test_bad_trackers_name_the_field(tmp_path: Path, trackers_value: list[str], message: str) -> None:
    config = tiny_config(tmp_path, total_steps=1)
    config["metrics"]["trackers"] = trackers_value
    with pytest.raises(ConfigError, match=r"metrics\.trackers") as error:
        parse_config(config)
    assert message in str(error.value)
