"""The Grafana dashboard of the chart (`dashboards/rlsd.json`), written by render.py with Grafana's own
typed builders (grafana-foundation-sdk, the release generated for Grafana 11.6).

Panels query the series that the chart's PodMonitors (jobs rlsd-learner, rlsd-rollout, rlsd-teacher,
with `namespace` and `run` labels) and ServiceMonitor (job rlsd-operator) collect; variables pick the
data source, the namespace and the run(s). To add a panel, add a `Graph` to a row of `ROWS`; the
real-Prometheus test (tests/chart/test_prometheus.py) then runs its queries against a real run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from string import ascii_uppercase
from typing import Any, Literal

from grafana_foundation_sdk.builders import common, dashboard, stat, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as models_common
from grafana_foundation_sdk.models import dashboard as models

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'namespace=~"$namespace", run=~"$run"'
LEARNER = f'{{job="rlsd-learner", {RUN}}}'
ROLLOUT = f'{{job="rlsd-rollout", {RUN}}}'
TEACHER = f'{{job="rlsd-teacher", {RUN}}}'
OPERATOR = '{job="rlsd-operator"}'
# Template variables: name -> (label, query); the runs are those whose learner reports a step.
VARIABLES = {
    "namespace": ("Namespace", 'label_values(rlsd_policy_version{job="rlsd-learner"}, namespace)'),
    "run": ("Run", 'label_values(rlsd_policy_version{job="rlsd-learner", namespace=~"$namespace"}, run)'),
}
BY_RUN = "{{namespace}}/{{run}}"
# A step on the learners: waiting for its batch (on-policy: the planner's rollout, reward and remote
# teacher phases; ahead: only what generation did not hide), colocated teacher, learning, weight
# push, checkpoint. They add up to the step time; the planner's own phases are drawn apart.
PHASES = ("plan_wait", "teacher", "learn", "sync", "checkpoint")
PLANNER_PHASES = ("rollout", "reward")


@dataclass(frozen=True)
class Graph:
    """One panel: (PromQL, legend) per query, a Grafana unit, and how it is drawn."""

    title: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "none"
    kind: Literal["timeseries", "stacked", "stat"] = "timeseries"


def quantile(q: float, histogram: str, selector: str, by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({histogram}_bucket{selector}[5m])))"


ROWS: dict[str, list[Graph]] = {
    "Progress": [
        Graph("Step (policy version)", ((f"rlsd_policy_version{LEARNER}", BY_RUN),), kind="stat"),
        Graph("Mean reward", ((f"rlsd_reward_mean{LEARNER}", BY_RUN),), "percentunit", "stat"),
        Graph("Held-out accuracy", ((f"rlsd_eval_accuracy{LEARNER}", BY_RUN),), "percentunit", "stat"),
        Graph("Newest checkpoint (step)", ((f"rlsd_checkpoint_step{LEARNER}", BY_RUN),), kind="stat"),
        Graph(
            "Reward",
            ((f"rlsd_reward_mean{LEARNER}", "mean {{run}}"), (f"rlsd_reward_std{LEARNER}", "std {{run}}")),
        ),
        Graph("Held-out accuracy", ((f"rlsd_eval_accuracy{LEARNER}", BY_RUN),), "percentunit"),
    ],
    "RLSD evidence weights": [
        Graph("Privileged-information gain (delta mean)", ((f"rlsd_delta_mean{LEARNER}", BY_RUN),)),
        Graph(
            "Weights clipped to [1-eps_w, 1+eps_w]",
            ((f"rlsd_weight_clipped_fraction{LEARNER}", BY_RUN),),
            "percentunit",
        ),
        Graph(
            "Lambda and mean weight",
            ((f"rlsd_lambda{LEARNER}", "lambda {{run}}"), (f"rlsd_weight_mean{LEARNER}", "weight {{run}}")),
        ),
        # Mean Delta by subgroup of tokens: an informative teacher puts the first wrong token of
        # incorrect responses well below the tokens before it, and A > 0 above A < 0.
        Graph(
            "Teacher informativeness",
            (
                (f"rlsd_delta_mean_positive{LEARNER}", "A > 0 {{run}}"),
                (f"rlsd_delta_mean_negative{LEARNER}", "A < 0 {{run}}"),
                (f"rlsd_delta_first_error{LEARNER}", "first error {{run}}"),
                (f"rlsd_delta_before_error{LEARNER}", "before error {{run}}"),
            ),
        ),
    ],
    "Learner": [
        Graph("Policy loss", ((f"rlsd_policy_loss{LEARNER}", BY_RUN),)),
        Graph("Clip ratio", ((f"rlsd_clip_ratio{LEARNER}", BY_RUN),), "percentunit"),
        Graph("Entropy", ((f"rlsd_entropy{LEARNER}", BY_RUN),)),
        Graph("Response length (tokens)", ((f"rlsd_response_length_mean{LEARNER}", BY_RUN),)),
        Graph("Gradient norm", ((f"rlsd_grad_norm{LEARNER}", BY_RUN),)),
    ],
    # rollout.max_staleness k >= 1: how old the policy behind each step's completions is, and the
    # truncated importance weights that correct for it (at k = 0 staleness is 0 and the ratios ~1).
    "Asynchronous rollouts": [
        Graph(
            "Rollout staleness (steps behind the learner)",
            (
                (f"rlsd_rollout_staleness{LEARNER}", "mean {{run}}"),
                (f"rlsd_rollout_staleness_max{LEARNER}", "max {{run}}"),
            ),
        ),
        Graph(
            "Importance ratio pi_learner / pi_rollout",
            tuple(
                (f"rlsd_importance_ratio_{stat}{LEARNER}", f"{stat} {{{{run}}}}")
                for stat in ("p50", "p99", "max")
            ),
        ),
        Graph(
            "Tokens at the importance cap",
            ((f"rlsd_importance_capped_fraction{LEARNER}", BY_RUN),),
            "percentunit",
        ),
        Graph("Rollout vs learner log-prob mismatch", ((f"rlsd_logprob_mismatch{LEARNER}", BY_RUN),)),
        Graph(
            "Learner waiting for its batch",
            (
                (f"rlsd_time_plan_wait_seconds{LEARNER}", "wait {{run}}"),
                (f"rlsd_step_seconds{LEARNER}", "step {{run}}"),
            ),
            "s",
        ),
        Graph(
            "Dynamic sampling",
            (
                (f"rlsd_dynamic_sampling_dropped_groups{LEARNER}", "dropped groups {{run}}"),
                (f"rlsd_dynamic_sampling_rounds{LEARNER}", "extra rounds {{run}}"),
            ),
        ),
    ],
    "Throughput and step time": [
        Graph("Tokens per second", ((f"rlsd_tokens_per_second{LEARNER}", BY_RUN),)),
        Graph(
            "Step time by phase",
            tuple((f"rlsd_time_{phase}_seconds{LEARNER}", f"{phase} {{{{run}}}}") for phase in PHASES),
            "s",
            "stacked",
        ),
        Graph(
            "Planner time per batch",
            tuple(
                (f"rlsd_time_{phase}_seconds{LEARNER}", f"{phase} {{{{run}}}}") for phase in PLANNER_PHASES
            ),
            "s",
        ),
        Graph("Step time", ((f"rlsd_step_seconds{LEARNER}", BY_RUN),), "s"),
    ],
    "Checkpoints, restarts and preemptions": [
        Graph(
            "Steps since the newest checkpoint",
            ((f"rlsd_policy_version{LEARNER} - rlsd_checkpoint_step{LEARNER}", BY_RUN),),
        ),
        Graph(
            "Gang restarts (all runs, 1h)",
            (
                (f"sum(increase(rlsd_operator_restarts_total{OPERATOR}[1h]))", "failures"),
                (f"sum(increase(rlsd_operator_preemptions_total{OPERATOR}[1h]))", "preemptions"),
            ),
        ),
        Graph(
            "Stale rollouts and verifier errors",
            (
                (f"rlsd_stale_rollouts{LEARNER}", "stale {{run}}"),
                (f"rate(rlsd_verifier_errors_total{LEARNER}[5m])", "verifier errors/s {{run}}"),
                (f"rate(rlsd_verifier_timeouts_total{LEARNER}[5m])", "verifier timeouts/s {{run}}"),
            ),
        ),
    ],
    "Rollout servers (vLLM) and teachers": [
        Graph("Servers up", ((f'up{{job=~"rlsd-rollout|rlsd-teacher", {RUN}}}', "{{pod}}"),), kind="stat"),
        Graph(
            "Generated tokens per second",
            (
                (f"sum by (pod) (rate(vllm:generation_tokens_total{ROLLOUT}[5m]))", "vLLM {{pod}}"),
                (f"sum by (pod) (rate(rlsd_rollout_generated_tokens_total{ROLLOUT}[5m]))", "CPU {{pod}}"),
            ),
        ),
        Graph(
            "KV-cache use",
            # vLLM >= 0.10 exports kv_cache_usage_perc; older releases gpu_cache_usage_perc.
            (
                (f"vllm:kv_cache_usage_perc{ROLLOUT}", "{{pod}}"),
                (f"vllm:gpu_cache_usage_perc{ROLLOUT}", "{{pod}} (vLLM < 0.10)"),
            ),
            "percentunit",
        ),
        Graph(
            "Requests running / waiting",
            (
                (f"vllm:num_requests_running{ROLLOUT}", "running {{pod}}"),
                (f"vllm:num_requests_waiting{ROLLOUT}", "waiting {{pod}}"),
                (f"rlsd_rollout_requests_in_flight{ROLLOUT}", "in flight {{pod}}"),
            ),
        ),
        Graph(
            "Teacher scoring latency (p95)",
            ((quantile(0.95, "rlsd_teacher_request_latency_seconds", TEACHER, "le, pod"), "{{pod}}"),),
            "s",
        ),
    ],
    "Operator": [
        Graph(
            "Runs by phase",
            ((f"sum by (phase) (rlsd_operator_runs{OPERATOR})", "{{phase}}"),),
            kind="stacked",
        ),
        Graph(
            "Reconcile duration",
            tuple(
                (quantile(q, "rlsd_operator_reconcile_duration_seconds", OPERATOR), f"p{round(q * 100)}")
                for q in (0.5, 0.95)
            ),
            "s",
        ),
        Graph(
            "Errors per second",
            ((f"sum by (kind) (rate(rlsd_operator_errors_total{OPERATOR}[5m]))", "{{kind}}"),),
        ),
    ],
}
# Grid: 24 columns; stats 4 to a line (height 4), graphs 3 to a line (height 8), stats first in a row.
PER_LINE = {"stat": 4, "graph": 3}
HEIGHT = {"stat": 4, "graph": 8}


def _panel(graph: Graph) -> stat.Panel | timeseries.Panel:
    panel: stat.Panel | timeseries.Panel
    if graph.kind == "stat":
        panel = (
            stat.Panel()
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False).fields(""))
            .color_mode(models_common.BigValueColorMode.VALUE)
        )
    else:
        panel = (
            timeseries.Panel()
            .draw_style(models_common.GraphDrawStyle.LINE)
            .line_width(1)
            .show_points(models_common.VisibilityMode.NEVER)
            .fill_opacity(60 if graph.kind == "stacked" else 10)
            .legend(
                common.VizLegendOptions()
                .display_mode(models_common.LegendDisplayMode.LIST)
                .placement(models_common.LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .tooltip(common.VizTooltipOptions().mode(models_common.TooltipDisplayMode.MULTI))
        )
        if graph.kind == "stacked":
            panel = panel.stacking(common.StackingConfig().mode(models_common.StackingMode.NORMAL).group("A"))
    panel = panel.title(graph.title).unit(graph.unit).datasource(DATASOURCE)
    for ref, (expr, legend) in zip(ascii_uppercase, graph.queries, strict=False):
        panel = panel.with_target(
            PrometheusQuery().ref_id(ref).expr(expr).legend_format(legend).datasource(DATASOURCE)
        )
    return panel


def _variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .multi(True)
        .all_value(".*")
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .current(models.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("RLSD training runs")
        .uid("rlsd-runs")
        .description(
            "RLSDRuns: reward, RLSD weights, learner, asynchronous rollouts, throughput, checkpoints, "
            "vLLM, operator"
        )
        .tags(["rlsd", "llm", "training"])
        .timezone("browser")
        .editable()
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for name, (label, query) in VARIABLES.items():
        board = board.with_variable(_variable(name, label, query))
    panel_id, y = 1, 0
    for title, graphs in ROWS.items():
        row = dashboard.Row(title).id(panel_id).grid_pos(models.GridPos(h=1, w=24, x=0, y=y))
        board = board.with_row(row)
        panel_id, y = panel_id + 1, y + 1
        for kind in ("stat", "graph"):
            group = [g for g in graphs if (g.kind == "stat") == (kind == "stat")]
            width = 24 // PER_LINE[kind]
            for i, graph in enumerate(group):
                x, line = (i % PER_LINE[kind]) * width, i // PER_LINE[kind]
                grid = models.GridPos(h=HEIGHT[kind], w=width, x=x, y=y + line * HEIGHT[kind])
                board = board.with_panel(_panel(graph).id(panel_id).grid_pos(grid))
                panel_id += 1
            y += -(-len(group) // PER_LINE[kind]) * HEIGHT[kind]
    return board


def dashboard_json() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def model() -> dict[str, Any]:
    """The dashboard as Grafana reads it (a JSON object)."""
    return json.loads(dashboard_json())
