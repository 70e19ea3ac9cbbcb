"""The Grafana dashboard of the chart (`dashboards/rlsd.json`), written by render.py.

Panels query the series that the chart's PodMonitors (jobs rlsd-learner, rlsd-rollout, rlsd-teacher,
with a `run` label) and ServiceMonitor (job rlsd-operator) collect; variables pick the data source,
the namespace and the run(s).
"""

from __future__ import annotations

import json
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'namespace=~"$namespace", run=~"$run"'
LEARNER = f'{{job="rlsd-learner", {RUN}}}'
ROLLOUT = f'{{job="rlsd-rollout", {RUN}}}'
TEACHER = f'{{job="rlsd-teacher", {RUN}}}'
OPERATOR = '{job="rlsd-operator"}'
BY_RUN = "{{namespace}}/{{run}}"

# (title, [(expr, legend)], unit, kind) per row; kind "stat" or "timeseries" (stacked when "stacked").
Panel = tuple[str, list[tuple[str, str]], str, str]
ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Progress",
        [
            ("Step (policy version)", [(f"rlsd_policy_version{LEARNER}", BY_RUN)], "none", "stat"),
            ("Mean reward", [(f"rlsd_reward_mean{LEARNER}", BY_RUN)], "percentunit", "stat"),
            ("Held-out accuracy", [(f"rlsd_eval_accuracy{LEARNER}", BY_RUN)], "percentunit", "stat"),
            ("Newest checkpoint (step)", [(f"rlsd_checkpoint_step{LEARNER}", BY_RUN)], "none", "stat"),
            (
                "Reward",
                [
                    (f"rlsd_reward_mean{LEARNER}", "mean {{run}}"),
                    (f"rlsd_reward_std{LEARNER}", "std {{run}}"),
                ],
                "none",
                "timeseries",
            ),
            ("Held-out accuracy", [(f"rlsd_eval_accuracy{LEARNER}", BY_RUN)], "percentunit", "timeseries"),
        ],
    ),
    (
        "RLSD evidence weights",
        [
            (
                "Privileged-information gain (delta mean)",
                [(f"rlsd_delta_mean{LEARNER}", BY_RUN)],
                "none",
                "timeseries",
            ),
            (
                "Weights clipped to [1-eps_w, 1+eps_w]",
                [(f"rlsd_weight_clipped_fraction{LEARNER}", BY_RUN)],
                "percentunit",
                "timeseries",
            ),
            (
                "Lambda and mean weight",
                [
                    (f"rlsd_lambda{LEARNER}", "lambda {{run}}"),
                    (f"rlsd_weight_mean{LEARNER}", "weight {{run}}"),
                ],
                "none",
                "timeseries",
            ),
        ],
    ),
    (
        "Learner",
        [
            ("Policy loss", [(f"rlsd_policy_loss{LEARNER}", BY_RUN)], "none", "timeseries"),
            ("Clip ratio", [(f"rlsd_clip_ratio{LEARNER}", BY_RUN)], "percentunit", "timeseries"),
            ("Entropy", [(f"rlsd_entropy{LEARNER}", BY_RUN)], "none", "timeseries"),
            (
                "Response length (tokens)",
                [(f"rlsd_response_length_mean{LEARNER}", BY_RUN)],
                "none",
                "timeseries",
            ),
            ("Gradient norm", [(f"rlsd_grad_norm{LEARNER}", BY_RUN)], "none", "timeseries"),
            (
                "Rollout vs learner log-prob mismatch",
                [(f"rlsd_logprob_mismatch{LEARNER}", BY_RUN)],
                "none",
                "timeseries",
            ),
        ],
    ),
    (
        "Throughput and step time",
        [
            ("Tokens per second", [(f"rlsd_tokens_per_second{LEARNER}", BY_RUN)], "none", "timeseries"),
            (
                "Step time by phase",
                [
                    (f"rlsd_time_{phase}_seconds{LEARNER}", f"{phase} {{{{run}}}}")
                    for phase in ("rollout", "reward", "teacher", "learn", "sync", "checkpoint")
                ],
                "s",
                "stacked",
            ),
            ("Step time", [(f"rlsd_step_seconds{LEARNER}", BY_RUN)], "s", "timeseries"),
        ],
    ),
    (
        "Checkpoints, restarts and preemptions",
        [
            (
                "Steps since the newest checkpoint",
                [(f"rlsd_policy_version{LEARNER} - rlsd_checkpoint_step{LEARNER}", BY_RUN)],
                "none",
                "timeseries",
            ),
            (
                "Gang restarts (all runs, 1h)",
                [
                    (f"sum(increase(rlsd_operator_restarts_total{OPERATOR}[1h]))", "failures"),
                    (f"sum(increase(rlsd_operator_preemptions_total{OPERATOR}[1h]))", "preemptions"),
                ],
                "none",
                "timeseries",
            ),
            (
                "Stale rollouts and verifier errors",
                [
                    (f"rlsd_stale_rollouts{LEARNER}", "stale {{run}}"),
                    (f"rate(rlsd_verifier_errors_total{LEARNER}[5m])", "verifier errors/s {{run}}"),
                    (f"rate(rlsd_verifier_timeouts_total{LEARNER}[5m])", "verifier timeouts/s {{run}}"),
                ],
                "none",
                "timeseries",
            ),
        ],
    ),
    (
        "Rollout servers (vLLM) and teachers",
        [
            (
                "Generated tokens per second",
                [
                    (f"sum by (pod) (rate(vllm:generation_tokens_total{ROLLOUT}[5m]))", "vLLM {{pod}}"),
                    (
                        f"sum by (pod) (rate(rlsd_rollout_generated_tokens_total{ROLLOUT}[5m]))",
                        "CPU server {{pod}}",
                    ),
                ],
                "none",
                "timeseries",
            ),
            (
                "KV-cache use",
                [
                    # vLLM >= 0.10 exports kv_cache_usage_perc; older releases gpu_cache_usage_perc.
                    (f"vllm:kv_cache_usage_perc{ROLLOUT}", "{{pod}}"),
                    (f"vllm:gpu_cache_usage_perc{ROLLOUT}", "{{pod}} (vLLM < 0.10)"),
                ],
                "percentunit",
                "timeseries",
            ),
            (
                "Requests running / waiting",
                [
                    (f"vllm:num_requests_running{ROLLOUT}", "running {{pod}}"),
                    (f"vllm:num_requests_waiting{ROLLOUT}", "waiting {{pod}}"),
                    (f"rlsd_rollout_requests_in_flight{ROLLOUT}", "in flight {{pod}}"),
                ],
                "none",
                "timeseries",
            ),
            (
                "Teacher scoring latency (p95)",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, pod) "
                        f"(rate(rlsd_teacher_request_latency_seconds_bucket{TEACHER}[5m])))",
                        "{{pod}}",
                    )
                ],
                "s",
                "timeseries",
            ),
            ("Servers up", [(f'up{{job=~"rlsd-rollout|rlsd-teacher", {RUN}}}', "{{pod}}")], "none", "stat"),
        ],
    ),
    (
        "Operator",
        [
            (
                "Runs by phase",
                [(f"sum by (phase) (rlsd_operator_runs{OPERATOR})", "{{phase}}")],
                "none",
                "stacked",
            ),
            (
                "Reconcile duration",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        f"(rate(rlsd_operator_reconcile_duration_seconds_bucket{OPERATOR}[5m])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (le) "
                        f"(rate(rlsd_operator_reconcile_duration_seconds_bucket{OPERATOR}[5m])))",
                        "p95",
                    ),
                ],
                "s",
                "timeseries",
            ),
            (
                "Errors per second",
                [(f"sum by (kind) (rate(rlsd_operator_errors_total{OPERATOR}[5m]))", "{{kind}}")],
                "none",
                "timeseries",
            ),
        ],
    ),
]


def _panel(panel_id: int, panel: Panel, x: int, y: int, width: int) -> dict[str, Any]:
    title, queries, unit, kind = panel
    height = 4 if kind == "stat" else 8
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if kind == "stacked":
        custom |= {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60}
    result: dict[str, Any] = {
        "id": panel_id,
        "type": "stat" if kind == "stat" else "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": x, "y": y},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
        "fieldConfig": {
            "defaults": {"unit": unit, **({} if kind == "stat" else {"custom": custom})},
            "overrides": [],
        },
        "options": (
            {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"}
            if kind == "stat"
            else {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
        ),
    }
    return result


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id, y = panel_id + 1, y + 1
        stats = [p for p in row_panels if p[3] == "stat"]
        graphs = [p for p in row_panels if p[3] != "stat"]
        for group, per_line in ((stats, 4), (graphs, 3)):
            for i, panel in enumerate(group):
                width = 24 // per_line
                built = _panel(panel_id, panel, (i % per_line) * width, y + (i // per_line) * 8, width)
                panels.append(built)
                panel_id += 1
            if group:
                lines = (len(group) + per_line - 1) // per_line
                y += lines * (4 if group is stats else 8)
    return {
        "title": "RLSD training runs",
        "uid": "rlsd-runs",
        "description": "RLSDRuns: reward, RLSD weights, learner, throughput, checkpoints, vLLM, operator",
        "tags": ["rlsd", "llm", "training"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": True, "text": "Prometheus", "value": "prometheus"},
                    "hide": 0,
                },
                _variable(
                    "namespace",
                    "Namespace",
                    'label_values(rlsd_policy_version{job="rlsd-learner"}, namespace)',
                ),
                _variable(
                    "run",
                    "Run",
                    'label_values(rlsd_policy_version{job="rlsd-learner", namespace=~"$namespace"}, run)',
                ),
            ]
        },
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
