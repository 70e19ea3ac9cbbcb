"""The chart's alerts and dashboard: `promtool check rules` and `promtool test rules` (each alert fires
on the series it is about, and not before), every metric name they use is one that the trainer, its
servers and the operator really export (scraped from a real local run, real servers and the
operator's registry), and the dashboard JSON has the structure Grafana needs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from charttools import CHART, by_kind, run, template
from prometheus_client.parser import text_string_to_metric_families

from rlsd_contracts import wire

# vLLM's own series that the dashboard reads (it scrapes them as they are); the names are those of
# vLLM's "Production Metrics" documentation (docs.vllm.ai/en/stable/usage/metrics/):
# kv_cache_usage_perc since v0.10 (V1 engine), gpu_cache_usage_perc before.
VLLM_METRICS = {
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
}
# Series that Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}
METRIC = re.compile(r"\b(rlsd_[a-z0-9_]+|vllm:[a-z0-9_:]+|up)\b(?=\s*[{\[)]|\s*$|\s*[-+*/<>=])")


def rules(helm: str) -> dict:
    (rule,) = by_kind(template(helm, "monitoring.prometheusRule.enabled=true"), "PrometheusRule")
    return rule["spec"]


def used_metrics(expressions: list[str]) -> set[str]:
    found = set()
    for expr in expressions:
        without_labels = re.sub(r"\{[^}]*\}", "{}", expr)
        found |= set(METRIC.findall(without_labels))
    return found


def dashboard() -> dict:
    return json.loads((CHART / "dashboards/rlsd.json").read_text())


def dashboard_expressions() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_rules_pass_promtool_check(helm: str, tools: Path, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules(helm)))
    result = run([str(tools / "promtool"), "check", "rules", str(path)])
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alerts_fire_on_what_they_watch(helm: str, tools: Path, tmp_path: Path) -> None:
    """`promtool test rules`: series over time, and the alerts expected at given times (the
    annotations are left out here: `promtool check rules` checks their templates)."""
    spec = rules(helm)
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    learner = 'job="rlsd-learner", namespace="team-a", run="demo", pod="demo-learner-a1-0", instance="i"'
    rollout = 'job="rlsd-rollout", namespace="team-a", run="demo", pod="demo-rollout-0", instance="r"'
    operator = 'job="rlsd-operator", instance="o", pod="op"'

    def labels(text: str) -> dict[str, str]:
        return dict(pair.split("=") for pair in text.replace('"', "").split(", "))

    # (alert, a time it must not fire yet, a time it must fire, the labels it fires with, severity)
    cases = [
        ("RLSDRunFailed", "2m", "4m", 'job="rlsd-operator", phase="Failed"', "critical"),
        ("RLSDRestartStorm", "11m", "14m", 'job="rlsd-operator"', "warning"),
        ("RLSDRunStalled", "30m", "50m", learner, "warning"),
        ("RLSDRolloutServerDown", "6m", "10m", rollout, "critical"),
        ("RLSDRewardCollapse", "45m", "90m", learner, "warning"),
    ]
    expectations = [{"eval_time": "30m", "alertname": "RLSDOperatorReconcileErrors", "exp_alerts": []}]
    for name, before, after, text, severity in cases:
        fired = {"exp_labels": labels(text) | {"alertname": name, "severity": severity}}
        expectations += [
            {"eval_time": before, "alertname": name, "exp_alerts": []},
            {"eval_time": after, "alertname": name, "exp_alerts": [fired]},
        ]
    errors = f'rlsd_operator_errors_total{{{operator}, kind="reconcile"}}'
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'rlsd_operator_runs{{{operator}, phase="Failed"}}', "values": "0 0 0 1x20"},
                    {"series": f"rlsd_operator_restarts_total{{{operator}}}", "values": "0x10 1 2 2x20"},
                    {"series": f"rlsd_operator_preemptions_total{{{operator}}}", "values": "0x12 1x20"},
                    {"series": errors, "values": "0x40"},
                    # 10 steps, then none: stalled once 30m pass without a change, plus 5m.
                    {"series": f"rlsd_policy_version{{{learner}}}", "values": "1+1x10 11x80"},
                    {"series": f"up{{{rollout}}}", "values": "1 1 1 0x20"},
                    # Reward 0.6 for 40m, then 0.1.
                    {"series": f"rlsd_reward_mean{{{learner}}}", "values": "0.6x40 0.1x60"},
                ],
                "alert_rule_test": expectations,
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = run([str(tools / "promtool"), "test", "rules", "tests.yaml"], cwd=tmp_path)
    assert "SUCCESS" in result.stdout


def test_dashboard_structure() -> None:
    """What Grafana needs of a dashboard model (no schema package for it is published): the required
    fields, unique panel ids, every panel with a Prometheus datasource and targets, the variables."""
    board = dashboard()
    for field in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert board[field], field
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "run"}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    graphs = [p for p in board["panels"] if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"], panel["title"]
            if "rlsd-learner" in target["expr"] or "rlsd-rollout" in target["expr"]:
                assert 'namespace=~"$namespace"' in target["expr"] and 'run=~"$run"' in target["expr"]
    titles = " ".join(p["title"] for p in board["panels"])
    for topic in ("reward", "accuracy", "delta", "clip", "entropy", "length", "tokens", "phase", "checkpoint",
                  "restarts", "KV-cache", "Reconcile", "Errors"):  # fmt: skip
        assert topic.lower() in titles.lower(), topic


# -- what the processes really export ---------------------------------------------------------------


def tiny_config(output_dir: Path) -> dict:
    """Two steps of the embedded task (as tests/trainer/test_local_run.py's), remote-free, from a
    policy warmed up enough that its groups carry signal and some responses start as their reference
    does: the teacher's diagnostics by the sign of A and before the first error need both."""
    return {
        "run": {"seed": 7, "output_dir": str(output_dir), "total_steps": 2},
        "model": {"path": "embedded"},
        "data": {
            "train": {"kind": "embedded", "split": "train"},
            "eval": {"kind": "embedded", "split": "eval"},
            "embedded": {"num_train": 400, "num_eval": 16, "min_terms": 2, "max_terms": 3},
        },
        "warmup": {"steps": 60, "batch_size": 16, "lr": 3e-3},
        "algorithm": {"name": "rlsd", "group_size": 4, "lam": {"decay_steps": 4}},
        "rollout": {"prompts_per_step": 3, "sampling": {"max_new_tokens": 16}},
        "optim": {"lr": 1e-3},
        "teacher": {"mode": "frozen", "sync_interval": 2},
        "reward": {"verifier": "math", "workers": 1},
        "checkpoint": {"every": 1, "keep_last": 1},
        "metrics": {"prometheus_port": None, "progress_bar": False},
        "eval": {"every": 2, "max_examples": 16, "max_new_tokens": 16},
        "learner": {"micro_batch_tokens": 256},
    }


def scrape(url: str) -> set[str]:
    """The sample names (histograms' `_bucket`, counters' `_total` included) at a /metrics URL."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlsd_contracts.config import parse_config
    from rlsd_trainer.training.trainer import run_training

    output = tmp_path_factory.mktemp("local-run")
    run_training(parse_config(tiny_config(output)))
    return output


def trainer_exported(run_dir: Path) -> set[str]:
    """A real run's metrics.jsonl, fed through the trainer's exporter as the loop feeds it (gauges,
    and counters for the cumulative keys), scraped from its HTTP endpoint."""
    from rlsd_trainer.monitoring.metrics import COUNTERS, MetricsLogger, read_jsonl

    logger = MetricsLogger(run_dir / "replay" / "metrics.jsonl", prometheus_port=0)
    try:
        for record in read_jsonl(run_dir / "metrics.jsonl"):
            step = int(record.pop("step"))
            record.pop("time", None)
            logger.log(step, record)
            for name in COUNTERS:
                if name in record:
                    logger.increment(name, record[name])
        return scrape(f"http://127.0.0.1:{logger.port}/metrics")
    finally:
        logger.close()


def server_exported(role: str, model: Path, tmp_path: Path) -> set[str]:
    """`rlsd-trainer serve <role>` on the run's initial policy, scraped once healthy."""
    from controlplane import free_port

    port = free_port()
    cli = str(Path(sys.executable).parent / "rlsd-trainer")
    log = tmp_path / f"{role}.log"
    command = [cli, "serve", role, "--model", str(model), "--port", str(port), "--host", "127.0.0.1"]
    command += ["--weight-transfer-config", '{"backend": "gloo"}']
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                return scrape(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def operator_exported() -> set[str]:
    """The operator's registry with every labelled series present (as after a first reconcile)."""
    code = (
        "from prometheus_client import generate_latest\n"
        "from rlsd_operator import metrics\n"
        "metrics.publish_phases({})\n"
        "print(generate_latest().decode())\n"
    )
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_every_metric_in_alerts_and_dashboard_is_exported(helm: str, local_run: Path, tmp_path: Path) -> None:
    exported = trainer_exported(local_run) | operator_exported()
    for role in (wire.ROLLOUT, wire.TEACHER):
        exported |= server_exported(role, local_run / "initial-policy", tmp_path)
    exported |= VLLM_METRICS | PROMETHEUS_SERIES
    # What the chart's text names: the alert expressions and the dashboard's queries.
    alert_exprs = [r["expr"] for g in rules(helm)["groups"] for r in g["rules"]]
    used = used_metrics(alert_exprs) | used_metrics(dashboard_expressions())
    assert len(used) >= 35
    assert not used - exported, f"not exported by anything: {sorted(used - exported)}"
    # The operator's own progress fields come from series the trainer really exports.
    from rlsd_operator.metrics import PROGRESS_METRICS

    assert set(PROGRESS_METRICS) <= exported
