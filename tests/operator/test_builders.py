"""The pure parts of the operator, without a cluster: trainer config, Kubernetes objects, decisions."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from rlsdrun_samples import defaulted_run

from rlsd_contracts import liveness as liveness_module
from rlsd_contracts import wire
from rlsd_contracts.config import parse_config
from rlsd_operator import admission, builders, lifecycle, metrics, names
from rlsd_operator.lifecycle import Verdict
from rlsd_operator.trainer_config import InvalidSpec, build_trainer_config

LEARNER0 = "demo-learner-0.demo-learners.team-a.svc.cluster.local"


def config_of(spec: dict | None = None) -> dict:
    run = defaulted_run(spec=spec)
    return build_trainer_config(run["spec"], "demo", "team-a")


def test_trainer_config_maps_every_field_to_the_trainer_schema() -> None:
    config = config_of(
        {
            "seed": 7,
            "algorithm": {"name": "grpo+opsd", "groupSize": 16, "epsW": 0.3, "klCoef": 0.01},
            "optim": {"lr": 1e-6, "gradClip": 0.5},
            "reward": {"verifier": "numeric", "timeoutSeconds": 2.5, "workers": 4},
            "checkpoint": {"every": 5, "asyncSave": True},
            "dataset": {"eval": {"kind": "parquet", "path": "/data/test.parquet", "answerField": "ans"}},
        }
    )
    assert config["run"] == {"name": "demo", "output_dir": "/checkpoints/demo", "total_steps": 100, "seed": 7}
    assert config["algorithm"] == {"name": "grpo+opsd", "group_size": 16, "eps_w": 0.3, "kl_coef": 0.01}
    assert config["optim"] == {"lr": 1e-6, "grad_clip": 0.5}
    assert config["reward"] == {"verifier": "numeric", "timeout_s": 2.5, "workers": 4}
    assert config["checkpoint"] == {"every": 5, "async_save": True, "preemption_grace_s": 120.0}
    assert config["data"]["train"] == {
        "kind": "jsonl",
        "path": "/data/train.jsonl",
        "question_field": "problem",
    }
    assert config["data"]["eval"] == {"kind": "parquet", "path": "/data/test.parquet", "answer_field": "ans"}
    assert config["metrics"]["prometheus_port"] == names.METRICS_PORT


def test_lambda_schedule_maps_to_lam() -> None:
    config = config_of({"algorithm": {"lambda": {"kind": "constant", "initial": 0.3, "decaySteps": 9}}})
    assert config["algorithm"]["lam"] == {"kind": "constant", "initial": 0.3, "decay_steps": 9}


def test_remote_rollout_and_teacher_get_stable_dns_urls_and_learner_0_as_transfer_host() -> None:
    config = config_of(
        {"teacher": {"placement": "remote", "replicas": 1, "image": "t", "weightTransfer": "gloo"}}
    )
    servers = config["rollout"]["servers"]
    assert config["rollout"]["backend"] == "remote"
    assert servers["urls"] == [
        f"http://demo-rollout-{i}.demo-rollout.team-a.svc.cluster.local:{names.SERVER_PORT}" for i in range(2)
    ]
    assert servers["weight_transfer"] == {"backend": "nccl", "host": LEARNER0, "port": 29600}
    teacher = config["teacher"]["servers"]
    assert teacher["urls"] == ["http://demo-teacher-0.demo-teacher.team-a.svc.cluster.local:8000"]
    assert teacher["weight_transfer"] == {"backend": "gloo", "host": LEARNER0, "port": 29700}


def test_cpu_rollout_defaults_to_gloo_and_filesystem_gets_a_shared_dir() -> None:
    assert (
        config_of({"rollout": {"backend": "cpu"}})["rollout"]["servers"]["weight_transfer"]["backend"]
        == "gloo"
    )
    transfer = config_of({"rollout": {"weightTransfer": "filesystem"}})["rollout"]["servers"][
        "weight_transfer"
    ]
    assert transfer["shared_dir"] == "/checkpoints/demo/weights"


def test_local_rollout_renders_no_servers() -> None:
    config = config_of({"rollout": {"backend": "local", "promptsPerStep": 8}})
    assert config["rollout"] == {"prompts_per_step": 8}


def test_asynchronous_rollout_fields_render_to_the_trainer_config() -> None:
    config = config_of(
        {
            "rollout": {"maxStaleness": 2, "dynamicSampling": {"enabled": True, "maxRounds": 5}},
            "algorithm": {"importanceCap": 3.0},
        }
    )
    assert config["rollout"]["max_staleness"] == 2
    assert config["rollout"]["dynamic_sampling"] == {"enabled": True, "max_rounds": 5}
    assert config["algorithm"]["importance_cap"] == 3.0
    assert parse_config(config).rollout.max_staleness == 2


def test_trainer_config_is_merged_last() -> None:
    config = config_of(
        {"trainerConfig": {"algorithm": {"ppo_epochs": 2}, "run": {"seed": 3}, "eval": {"every": 5}}}
    )
    assert config["algorithm"]["ppo_epochs"] == 2
    assert config["run"]["seed"] == 3 and config["run"]["name"] == "demo"
    assert config["eval"] == {"every": 5}


def test_rendered_config_is_valid_for_the_trainer() -> None:
    spec = {
        "algorithm": {"name": "rlsd", "lambda": {"initial": 0.5, "final": 0.0}, "epsW": 0.2},
        "optim": {"lr": 1e-6},
        "teacher": {"placement": "remote", "replicas": 2, "image": "t", "weightTransfer": "filesystem"},
        "trainerConfig": {"eval": {"every": 10}},
    }
    config = parse_config(config_of(spec))
    assert config.rollout.servers.weight_transfer.host == LEARNER0
    assert config.teacher.servers.weight_transfer.shared_dir == "/checkpoints/demo/weights"


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (
            {"trainerConfig": {"algorithm": {"gruop_size": 4}}},
            "spec.trainerConfig.algorithm.gruop_size: unknown",
        ),
        ({"optim": {"lr": "fast"}}, "spec.optim.lr: Input should be a valid number"),
        ({"optim": {"lr": -1}}, "spec.optim.lr: Input should be greater than 0"),
        ({"trainerConfig": {"rollout": {"prompts_per_step": 10**12}}}, "rollout.prompts_per_step: Input"),
        ({"trainerConfig": {"teacher": {"template": "no placeholders"}}}, "spec.trainerConfig.teacher"),
    ],
)
def test_a_config_the_trainer_would_refuse_names_the_spec_field(spec: dict, named: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        config_of(spec)
    assert named in str(refused.value)


def test_a_config_map_too_large_is_refused_with_its_size() -> None:
    run = defaulted_run(
        spec={"trainerConfig": {"teacher": {"template": "{question}{reference}" + "x" * 600_000}}}
    )
    with pytest.raises(InvalidSpec) as refused:
        builders.build_config_map(run)
    assert "shorten spec.trainerConfig" in str(refused.value) and "1048576" in str(refused.value)


def test_trackers_render_into_the_config_and_their_credentials_into_learner_env_only() -> None:
    spec = {
        "trackers": {
            "wandb": {
                "project": "math",
                "entity": "team",
                "apiKeySecret": {"name": "wandb", "key": "api-key"},
            },
            "mlflow": {
                "trackingUri": "https://mlflow.example",
                "tokenSecret": {"name": "ml", "key": "token"},
            },
            "tensorboard": {},
        }
    }
    run = defaulted_run(spec=spec)
    config = build_trainer_config(run["spec"], "demo", "team-a")
    metrics_section = parse_config(config).metrics
    assert metrics_section.trackers == ("wandb", "mlflow", "tensorboard")
    assert (metrics_section.wandb.project, metrics_section.wandb.entity) == ("math", "team")
    assert metrics_section.mlflow.tracking_uri == "https://mlflow.example"
    learner = builders.build_learner_pod(run, 0, 1)
    env = {e["name"]: e for e in learner["spec"]["containers"][0]["env"]}
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "ml", "key": "token"}}
    # Never in the ConfigMap (which any reader of the namespace's ConfigMaps sees), nor on servers.
    config_map = json.dumps(builders.build_config_map(run))
    assert "wandb" in config_map and "apiKeySecret" in config_map  # the spec names the Secret...
    assert "WANDB_API_KEY" not in config_map and "MLFLOW_TRACKING_TOKEN" not in config_map
    with_server = defaulted_run(spec={"rollout": {"backend": "cpu", "image": "t", "replicas": 1}} | spec)
    (server,) = builders.build_server_pods(with_server)
    variables = {e["name"] for e in server["spec"]["containers"][0]["env"]}
    assert not variables & {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN"}
    assert "trackers" not in config_of()["metrics"]


def test_every_secret_key_a_pod_reads_is_checked_before_pods_start() -> None:
    """The operator looks up exactly the Secret keys its pods read from the environment, naming the
    spec field, so a missing one is a ReferencesResolved condition, not CreateContainerConfigError."""
    spec = {
        "huggingFaceTokenSecret": {"name": "hf", "key": "token"},
        "trackers": {
            "wandb": {"project": "p", "apiKeySecret": {"name": "wandb", "key": "api-key"}},
            "mlflow": {"trackingUri": "https://mlflow.example", "tokenSecret": {"name": "ml", "key": "t"}},
        },
        "rollout": {"backend": "cpu", "image": "t", "replicas": 1},
    }
    run = defaulted_run(spec=spec)
    pods = [builders.build_learner_pod(run, 0, 1), *builders.build_server_pods(run)]
    read_by_pods = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for pod in pods
        for container in pod["spec"]["containers"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    checked = builders.secret_keys_read(run["spec"])
    assert {(ref["name"], ref["key"]) for _, ref in checked} == read_by_pods
    assert [field for field, _ in checked] == [
        "huggingFaceTokenSecret",
        "trackers.wandb.apiKeySecret",
        "trackers.mlflow.tokenSecret",
    ]
    assert builders.secret_keys_read(defaulted_run()["spec"]) == []


def test_config_map_holds_the_config_and_the_applied_spec() -> None:
    run = defaulted_run()
    config_map = builders.build_config_map(run)
    assert config_map["metadata"]["name"] == "demo-config"
    assert yaml.safe_load(config_map["data"]["config.yaml"])["run"]["name"] == "demo"
    assert json.loads(config_map["data"]["spec.json"]) == run["spec"]


def test_learner_pod() -> None:
    run = defaulted_run(
        spec={
            "huggingFaceTokenSecret": {"name": "hf", "key": "token"},
            "imagePullSecrets": [{"name": "registry"}],
            "scheduling": {"priorityClassName": "training", "schedulerName": "volcano"},
            "learner": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
        }
    )
    pod = builders.build_learner_pod(run, node_rank=1, attempt=3)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "demo-learner-a3-1"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "rlsd",
        "rlsd.io/run": "demo",
        "rlsd.io/role": "learner",
        "rlsd.io/attempt": "3",
        "rlsd.io/rank": "1",
    }
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "RLSDRun",
        "demo",
        "1234-5678",
        True,
    )
    assert meta["namespace"] == "team-a"
    assert (spec["hostname"], spec["subdomain"]) == ("demo-learner-1", "demo-learners")
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] > 120
    assert spec["priorityClassName"] == "training" and spec["schedulerName"] == "volcano"
    assert spec["nodeSelector"] == {"type": "kwok"} and spec["tolerations"]
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    container = spec["containers"][0]
    assert container["command"] == [
        "rlsd-trainer", "learner", "--config", "/etc/rlsd/config.yaml",
        "--nnodes", "2", "--nproc-per-node", "4", "--node-rank", "1",
        "--master-addr", LEARNER0, "--master-port", "29500",
    ]  # fmt: skip
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["NCCL_DEBUG"]["value"] == "INFO" and env["RLSD_ATTEMPT"]["value"] == "3"
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    # Why a learner failed: written by the trainer where the kubelet reads it, else the log's tail.
    termination_log = env[wire.TERMINATION_LOG_ENV]["value"]
    assert termination_log == container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"] == {"claimName": "checkpoints"}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["config"]["configMap"] == {"name": "demo-config"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    own = {
        "checkpoints": "/checkpoints",
        "shm": "/dev/shm",
        "config": "/etc/rlsd",
        "run-token": "/var/run/secrets/rlsd",
    }
    assert mounts == {**own, "tmp": "/tmp", "home": "/home/rlsd", "hf-cache": "/var/cache/huggingface"}


def test_vllm_rollout_pod() -> None:
    pod = builders.build_server_pod(
        defaulted_run(spec={"rollout": {"extraArgs": ["--max-model-len", "8192"]}}), "rollout", 1
    )
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["name"] == pod["spec"]["hostname"] == "demo-rollout-1"
    assert pod["spec"]["subdomain"] == "demo-rollout"
    assert container["command"] == [
        "vllm", "serve", "Qwen/Qwen3-0.6B", "--served-model-name", "policy", "--host", "0.0.0.0",
        "--port", "8000", "--middleware", "rlsd_trainer.serving.auth.RunTokenMiddleware",
        "--weight-transfer-config", '{"backend": "nccl"}', "--dtype", "bfloat16", "--max-model-len", "8192",
    ]  # fmt: skip
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in container["env"]
    assert pod["metadata"]["labels"]["rlsd.io/role"] == "rollout"
    assert pod["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH]


def test_cpu_rollout_and_teacher_pods_run_the_trainer_servers() -> None:
    run = defaulted_run(
        spec={
            "rollout": {"backend": "cpu", "weightTransfer": "filesystem"},
            "teacher": {"placement": "remote", "replicas": 1, "image": "t", "weightTransfer": "gloo"},
        }
    )
    rollout = builders.build_server_pod(run, "rollout", 0)["spec"]["containers"][0]["command"]
    assert rollout[:5] == ["rlsd-trainer", "serve", "rollout", "--model", "Qwen/Qwen3-0.6B"]
    # filesystem reloads through /collective_rpc, which needs no transfer engine.
    assert "--weight-transfer-config" not in rollout
    teacher = builders.build_server_pod(run, "teacher", 0)["spec"]["containers"][0]["command"]
    assert teacher[:3] == ["rlsd-trainer", "serve", "teacher"]
    assert teacher[teacher.index("--weight-transfer-config") + 1] == '{"backend": "gloo"}'
    vllm = defaulted_run(spec={"rollout": {"weightTransfer": "filesystem"}})
    assert "--weight-transfer-config" not in builders.server_command(vllm["spec"], "rollout")
    assert [p["metadata"]["name"] for p in builders.build_server_pods(run)] == [
        "demo-rollout-0", "demo-rollout-1", "demo-teacher-0",
    ]  # fmt: skip


def omp_threads(container: dict) -> list[str]:
    return [e["value"] for e in container["env"] if e["name"] == "OMP_NUM_THREADS"]


@pytest.mark.parametrize(
    ("learner", "threads"),
    [
        ({"resources": {"requests": {"cpu": "250m"}}}, ["1"]),  # 4 processes: at least one thread each
        ({"resources": {"requests": {"cpu": "16"}}}, ["4"]),  # 16 cores over 4 processes
        ({"resources": {"requests": {"cpu": "64"}, "limits": {"cpu": "8500m"}}}, ["2"]),  # the limit first
        ({}, []),  # no CPU named: torch's own default
        (
            {"resources": {"requests": {"cpu": "16"}}, "env": [{"name": "OMP_NUM_THREADS", "value": "3"}]},
            ["3"],
        ),
    ],
)
def test_torch_threads_follow_the_containers_cpu(learner: dict, threads: list[str]) -> None:
    """Torch's threads in a pod are the pod's CPU, not the node's cores (which other pods share)."""
    pod = builders.build_learner_pod(defaulted_run(spec={"learner": learner}), node_rank=0, attempt=1)
    assert omp_threads(pod["spec"]["containers"][0]) == threads


def test_the_trainers_servers_size_torch_threads_and_vllm_its_own() -> None:
    cpu = {"resources": {"requests": {"cpu": "200m"}}}
    run = defaulted_run(
        spec={
            "rollout": {"backend": "cpu", **cpu},
            "teacher": {
                "placement": "remote",
                "replicas": 1,
                "image": "t",
                "weightTransfer": "gloo",
                "resources": {"limits": {"cpu": 3}},
            },
        }
    )
    assert omp_threads(builders.build_server_pod(run, "rollout", 0)["spec"]["containers"][0]) == ["1"]
    assert omp_threads(builders.build_server_pod(run, "teacher", 0)["spec"]["containers"][0]) == ["3"]
    vllm = builders.build_server_pod(defaulted_run(spec={"rollout": cpu}), "rollout", 0)
    assert omp_threads(vllm["spec"]["containers"][0]) == []


@pytest.mark.parametrize(("push_timeout", "failures"), [(None, 62), (10, 4)])
def test_a_server_is_alive_while_its_engine_answers_or_has_stalled_no_longer_than_a_push(
    push_timeout: float | None, failures: int
) -> None:
    """Liveness goes through the engine (rlsd_contracts.liveness asks /weight_info, with the run's
    token); it tolerates a stall as long as the role's weight_push_timeout_s (trainerConfig, else the
    schema's 300 s) plus one probe timeout, and only once /health came up."""
    trainer_config = (
        {} if push_timeout is None else {"rollout": {"servers": {"weight_push_timeout_s": push_timeout}}}
    )
    run = defaulted_run(spec={"trainerConfig": trainer_config})
    container = builders.build_server_pod(run, "rollout", 0)["spec"]["containers"][0]
    liveness = container["livenessProbe"]
    module = liveness["exec"]["command"][liveness["exec"]["command"].index("-m") + 1]
    assert module == liveness_module.__name__ and liveness_module.LIVENESS_ROUTE == "/weight_info"
    tolerated = (liveness["failureThreshold"] - 1) * liveness["periodSeconds"]
    pushed = builders.weight_push_timeout_s(run["spec"], "rollout")
    assert (
        liveness["failureThreshold"] == failures and tolerated >= pushed + builders.LIVENESS_TIMEOUT_SECONDS
    )
    assert liveness["timeoutSeconds"] > float(liveness["exec"]["command"][-1])  # the probe's own comes first
    assert (
        container["startupProbe"]["httpGet"]["path"]
        == container["readinessProbe"]["httpGet"]["path"]
        == "/health"
    )
    assert container["env"] and any(e["name"] == wire.RUN_TOKEN_FILE_ENV for e in container["env"])
    # The kubelet ends a failed restartPolicy Never pod with the pod's grace, not the probe's.
    pod_spec = builders.build_server_pod(run, "rollout", 0)["spec"]
    assert pod_spec["restartPolicy"] == "Never" and "terminationGracePeriodSeconds" not in liveness
    assert pod_spec["terminationGracePeriodSeconds"] == builders.SERVER_GRACE_SECONDS


def test_the_runs_token_is_an_owned_immutable_secret_never_in_the_config() -> None:
    run = defaulted_run()
    secret = builders.build_run_token(run, "s3cret")
    assert secret["metadata"]["name"] == "demo-run-token" and secret["immutable"] is True
    assert secret["stringData"] == {"token": "s3cret"} and secret["type"] == "Opaque"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "1234-5678"
    assert "s3cret" not in json.dumps(builders.build_config_map(run))


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["--max-model-len", "4096"], "4096 (4096 tokens) cannot hold"),  # 512 + 4096 by default
        (["--max-model-len=4k"], "4k (4000 tokens) cannot hold"),
        (["--max-model-len", "5K"], None),  # 5120 >= 4608
        (["--max-model-len", "auto"], None),  # the model's own: not known here
        (["--max-model-len", "lots"], "is not a number of tokens"),
        ([], None),
    ],
)
def test_a_max_model_len_that_cannot_hold_prompt_and_response_is_refused(
    args: list, refused: str | None
) -> None:
    """vLLM answers 400 to every request that could outgrow --max-model-len: refused at apply time,
    naming both lengths and the bound that would do."""
    spec = defaulted_run(spec={"rollout": {"extraArgs": args}})["spec"]
    if refused is None:
        build_trainer_config(spec, "demo", "team-a")
        return
    with pytest.raises(InvalidSpec, match=re.escape(refused)) as error:
        build_trainer_config(spec, "demo", "team-a")
    if "cannot hold" in refused:
        assert "dataset.maxPromptTokens (512)" in str(error.value) and "at least 4608" in str(error.value)


def test_servers_of_the_embedded_model_build_it_from_the_runs_config() -> None:
    """`model.path: embedded` exists nowhere to load from: rlsd-trainer's servers build it from the
    run's config file, mounted as the learners have it (the learners push their weights first)."""
    run = defaulted_run(
        spec={
            "model": {"path": "embedded"},
            "dataset": {"train": {"kind": "embedded"}},
            "rollout": {"backend": "cpu"},
            "teacher": {"placement": "remote", "replicas": 1, "image": "t", "weightTransfer": "gloo"},
        }
    )
    for pod in builders.build_server_pods(run):
        container = pod["spec"]["containers"][0]
        command = container["command"]
        assert command[command.index("--model") + 1] == "embedded"
        assert command[command.index("--config") + 1] == "/etc/rlsd/config.yaml"
        assert {"name": "config", "mountPath": "/etc/rlsd", "readOnly": True} in container["volumeMounts"]
        assert {"name": "config", "configMap": {"name": "demo-config"}} in pod["spec"]["volumes"]
    served = builders.build_server_pod(defaulted_run(spec={"rollout": {"backend": "cpu"}}), "rollout", 0)
    assert "--config" not in served["spec"]["containers"][0]["command"]  # a model directory needs none
    assert "config" not in {v["name"] for v in served["spec"]["volumes"]}


def test_claim_template_makes_an_owned_claim_that_pods_mount() -> None:
    run = defaulted_run(spec={"checkpoint": {"volume": {"claimName": None}}})
    run["spec"]["checkpoint"]["volume"] = {"claimTemplate": {"resources": {"requests": {"storage": "1Ti"}}}}
    claim = builders.build_claim(run)
    assert claim is not None
    assert claim["metadata"]["name"] == "demo-checkpoints"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # 2 learners and 2 servers mount it
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "1234-5678"
    pod = builders.build_learner_pod(run, 0, 1)
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "demo-checkpoints"}
    assert builders.build_claim(defaulted_run()) is None


def test_services_are_headless_and_only_for_roles_with_pods() -> None:
    services = builders.build_services(defaulted_run())
    assert [s["metadata"]["name"] for s in services] == ["demo-learners", "demo-rollout"]
    learners = services[0]["spec"]
    assert learners["clusterIP"] == "None" and learners["publishNotReadyAddresses"] is True
    assert learners["selector"] == {
        "app.kubernetes.io/name": "rlsd",
        "rlsd.io/run": "demo",
        "rlsd.io/role": "learner",
    }
    local = builders.build_services(defaulted_run(spec={"rollout": {"backend": "local"}}))
    assert [s["metadata"]["name"] for s in local] == ["demo-learners"]


def every_kind_of_pod() -> list[dict]:
    """A learner, vLLM and CPU rollout servers and a teacher server."""
    teacher = {"placement": "remote", "replicas": 1, "image": "t", "weightTransfer": "gloo"}
    run = defaulted_run(spec={"teacher": teacher})
    cpu = defaulted_run(spec={"rollout": {"backend": "cpu"}})
    return [
        builders.build_learner_pod(run, 0, 1),
        *builders.build_server_pods(run),
        builders.build_server_pod(cpu, "rollout", 0),
    ]


@pytest.mark.parametrize("index", range(4), ids=["learner", "vllm-rollout", "teacher", "cpu-rollout"])
def test_every_pod_runs_non_root_without_privileges_token_or_writable_root(index: int) -> None:
    """The posture Pod Security "restricted" requires (the real API server checks it in
    test_restricted.py), plus a read-only root filesystem whose writable places are emptyDirs."""
    spec = every_kind_of_pod()[index]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert {kind for v in volumes.values() for kind in v if kind != "name"} <= {
        "emptyDir", "persistentVolumeClaim", "configMap", "secret",
    }  # fmt: skip
    # The one Secret is the run's token: read-only for the pods' group, named to the processes.
    (token,) = [v for v in volumes.values() if "secret" in v]
    assert token["secret"] == {"secretName": "demo-run-token", "defaultMode": 0o440}
    (container,) = spec["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    writable = [
        path for path, volume in mounts.items() if "emptyDir" in volume or "persistentVolumeClaim" in volume
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[wire.RUN_TOKEN_FILE_ENV] == "/var/run/secrets/rlsd/token"
    assert {"name": token["name"], "mountPath": "/var/run/secrets/rlsd", "readOnly": True} in container[
        "volumeMounts"
    ]
    for variable in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME"):
        assert any(env[variable] == path or env[variable].startswith(path + "/") for path in writable), (
            variable
        )
    assert env["TMPDIR"] == "/tmp" and "/tmp" in writable and "ports" in container
    assert not any(port.get("hostPort") for port in container["ports"])
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)


def test_a_variable_the_spec_sets_wins_over_the_posture() -> None:
    run = defaulted_run(spec={"learner": {"env": [{"name": "HF_HOME", "value": "/checkpoints/hf"}]}})
    env = builders.build_learner_pod(run, 0, 1)["spec"]["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "HF_HOME"] == ["/checkpoints/hf"]


def test_no_network_policy_unless_the_spec_or_the_operator_asks() -> None:
    assert builders.build_network_policy(defaulted_run()) is None
    on = builders.NetworkPolicyDefaults(enabled=True)
    assert (
        builders.build_network_policy(defaulted_run(spec={"networkPolicy": {"enabled": False}}), on) is None
    )
    policy = builders.build_network_policy(defaulted_run(spec={"networkPolicy": {"enabled": True}}))
    assert policy is not None and policy["metadata"]["name"] == "demo-netpol"
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "1234-5678"
    members = {"matchLabels": {"app.kubernetes.io/name": "rlsd", "rlsd.io/run": "demo"}}
    assert policy["spec"] == {
        "podSelector": members,
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": members}]}],  # no scraper: only each other
    }


def test_the_metrics_ports_admit_the_operator_and_the_scrapers() -> None:
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "rlsd-system"}}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    defaults = builders.NetworkPolicyDefaults.from_json(
        json.dumps({"enabled": True, "metricsFrom": [prometheus], "operator": operator})
    )
    policy = builders.build_network_policy(defaulted_run(), defaults)
    assert policy is not None
    scrapes = policy["spec"]["ingress"][1]
    assert scrapes["from"] == [operator, prometheus]
    assert scrapes["ports"] == [{"protocol": "TCP", "port": 9400}, {"protocol": "TCP", "port": 8000}]
    # torch's stores (rendezvous, weight transfer) have no credential: only the run's own pods reach them.
    torch_ports = {wire.RENDEZVOUS_PORT, wire.ROLLOUT_TRANSFER_PORT, wire.TEACHER_TRANSFER_PORT}
    assert not torch_ports & {p["port"] for p in scrapes["ports"]}
    assert policy["spec"]["ingress"][0] == {"from": [{"podSelector": {"matchLabels": names.labels("demo")}}]}
    own = {"podSelector": {"matchLabels": {"app": "grafana-agent"}}}
    mine = builders.build_network_policy(
        defaulted_run(spec={"networkPolicy": {"metricsFrom": [own]}}), defaults
    )
    assert mine is not None and mine["spec"]["ingress"][1]["from"] == [operator, own]
    assert mine["metadata"]["annotations"] != policy["metadata"]["annotations"]  # a change is seen


@pytest.mark.parametrize("text", ["{", "[]", '{"enabled": true, "metrics": []}'])
def test_bad_network_policy_settings_name_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match="RLSD_OPERATOR_NETWORK_POLICY"):
        builders.NetworkPolicyDefaults.from_json(text)


# What kube-apiserver answers (as tests/operator/test_refusals.py provokes it), and the reason it means.
FORBIDDEN = 'pods "p" is forbidden: '
REFUSALS = [
    (
        403,
        "PodSecurity",
        FORBIDDEN + 'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false',
    ),
    (403, "QuotaExceeded", FORBIDDEN + "exceeded quota: q, requested: pods=1, used: pods=2, limited: pods=2"),
    (403, "QuotaRequiresResources", FORBIDDEN + "failed quota: q: must specify limits.cpu for: learner"),
    (403, "LimitRange", FORBIDDEN + "maximum cpu usage per Container is 1, but limit is 2"),
    (403, "PriorityClassNotFound", FORBIDDEN + "no PriorityClass with name high was found"),
    (400, "AdmissionWebhook", 'admission webhook "deny.example.com" denied the request: no GPUs on Fridays'),
    (500, "AdmissionWebhook", 'Internal error occurred: failed calling webhook "deny.example.com": EOF'),
    (
        403,
        "AdmissionPolicy",
        FORBIDDEN + "ValidatingAdmissionPolicy 'gpus' with binding 'b' denied request: no",
    ),
    (403, "NotPermitted", 'pods is forbidden: User "x" cannot create resource "pods" in API group ""'),
    (422, "Invalid", 'Pod "p" is invalid: spec.containers[0].resources.requests: Invalid value: "2"'),
    (403, "CreateRefused", "something new"),
]


@pytest.mark.parametrize(("status", "reason", "message"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_a_refusal_names_its_cause_and_object(status: int, reason: str, message: str) -> None:
    assert admission.is_refusal(status, message)
    found, text = admission.refusal("Pod", "p", status, message)
    assert found == reason and text.startswith("Pod p refused by ") and text.endswith(message)


def test_server_failures_are_not_refusals() -> None:
    assert not admission.is_refusal(500, "etcdserver: request timed out")
    assert not admission.is_refusal(503, "the server is currently unable to handle the request")


def quota(hard: dict[str, str], used: dict[str, str]) -> dict:
    return {"status": {"hard": hard, "used": used}}


@pytest.mark.parametrize(
    ("old", "new", "freed"),
    [
        (None, quota({"pods": "2"}, {}), False),  # a new quota only restricts
        (quota({"pods": "2"}, {"pods": "2"}), None, True),  # deleted
        (quota({"requests.nvidia.com/gpu": "4"}, {}), quota({"requests.nvidia.com/gpu": "16"}, {}), True),
        (quota({"cpu": "4"}, {"cpu": "3500m"}), quota({"cpu": "4"}, {"cpu": "3"}), True),  # a pod ended
        (quota({"cpu": "4"}, {"cpu": "3"}), quota({"cpu": "4"}, {"cpu": "3500m"}), False),
        (quota({"cpu": "4", "pods": "4"}, {}), quota({"cpu": "4"}, {}), True),  # a limit went
        (quota({"memory": "1Gi"}, {}), quota({"memory": "1024Mi"}, {}), False),  # the same
    ],
)
def test_a_quota_frees_room_when_a_limit_grows_or_usage_shrinks(old: dict, new: dict, freed: bool) -> None:
    assert admission.quota_freed(old, new) is freed


# -- decisions ----------------------------------------------------------------------------------------


def learner(rank: int, phase: str = "Running", code: int | None = None, **status: object) -> dict:
    pod: dict = {
        "metadata": {"name": f"demo-learner-a1-{rank}", "labels": {names.LABEL_RANK: str(rank)}},
        "status": {"phase": phase, **status},
    }
    if code is not None:
        terminated = {"exitCode": code, "reason": "Error", "message": "data.train.path: no such file"}
        pod["status"]["containerStatuses"] = [{"name": "learner", "state": {"terminated": terminated}}]
    return pod


DISRUPTION = {
    "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
}


@pytest.mark.parametrize(
    ("pods", "verdict", "words"),
    [
        ([learner(0), learner(1)], Verdict.RUNNING, ""),
        ([learner(0), learner(1, "Pending")], Verdict.STARTING, "1 of 2"),
        ([learner(0, "Succeeded", 0), learner(1, "Succeeded", 0)], Verdict.SUCCEEDED, "exited 0"),
        ([learner(0, "Succeeded", 0), learner(1)], Verdict.RUNNING, ""),
        ([learner(0, "Failed", 75), learner(1)], Verdict.PREEMPTED, "exit code 75"),
        ([learner(0, "Failed", 76), learner(1)], Verdict.PREEMPTED, "exit code 76"),
        ([learner(0)], Verdict.PREEMPTED, "rank 1: pod gone"),
        ([learner(0), learner(1, **DISRUPTION)], Verdict.PREEMPTED, "PreemptionByScheduler"),
        ([learner(0), learner(1, "Failed", reason="Evicted")], Verdict.PREEMPTED, "Evicted"),
        ([learner(0, "Failed", 3), learner(1)], Verdict.BAD_CONFIG, "data.train.path: no such file"),
        ([learner(0, "Failed", 1), learner(1)], Verdict.FAILED, "exit code 1 (Error): data.train.path"),
        ([learner(0, "Failed", 1), learner(1, "Failed", 75)], Verdict.PREEMPTED, "exit code 75"),
        ([learner(0, "Failed", 3), learner(1, "Failed", 75)], Verdict.BAD_CONFIG, "exit code 3"),
    ],
)
def test_assess_gang(pods: list[dict], verdict: Verdict, words: str) -> None:
    state = lifecycle.assess_gang(pods, nodes=2)
    assert state.verdict is verdict
    assert words in state.message


def test_a_deleted_learner_still_running_counts_as_preempted() -> None:
    pod = learner(1)
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert lifecycle.assess_gang([learner(0), pod], 2).verdict is Verdict.PREEMPTED


def test_backoff_doubles_and_is_capped() -> None:
    policy = {"backoffSeconds": 10, "maxBackoffSeconds": 60}
    assert [lifecycle.backoff_seconds(policy, n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_deferred_fields_name_what_changed_except_live_fields() -> None:
    applied = defaulted_run()["spec"]
    spec = json.loads(json.dumps(applied))
    spec["learner"]["nodes"] = 4
    spec["steps"] = 200
    spec["suspend"] = True
    spec["restartPolicy"]["backoffLimit"] = 9
    assert lifecycle.deferred_fields(applied, spec) == ["learner.nodes", "steps"]


def test_set_condition_moves_the_transition_time_only_on_a_status_change() -> None:
    conditions = lifecycle.set_condition([], "Ready", False, "Starting", "", "t1")
    conditions = lifecycle.set_condition(conditions, "Ready", False, "Waiting", "m", "t2")
    assert conditions == [
        {"type": "Ready", "status": "False", "reason": "Waiting", "message": "m", "lastTransitionTime": "t1"}
    ]
    assert (
        lifecycle.set_condition(conditions, "Ready", True, "Running", "", "t3")[0]["lastTransitionTime"]
        == "t3"
    )


def test_parse_progress_reads_the_trainer_gauges() -> None:
    text = (
        "# TYPE rlsd_policy_version gauge\nrlsd_policy_version 42.0\nrlsd_reward_mean 0.5\nrlsd_lambda 0.2\n"
        "rlsd_rollout_staleness 0.5\nrlsd_rollout_staleness_max 1.0\n"
    )
    assert metrics.parse_progress(text) == {"step": 42.0, "reward": 0.5, "staleness": 1.0}


def test_the_operator_never_imports_torch_or_the_trainer() -> None:
    """It imports the contracts (the trainer's schema) but nothing that pulls in torch."""
    code = (
        "import sys, rlsd_operator.main, rlsd_operator.handlers, rlsd_operator.decide;"
        "assert 'rlsd_contracts.config' in sys.modules;"
        "bad = {'torch', 'rlsd_trainer'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
