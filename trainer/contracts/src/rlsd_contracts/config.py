"""The one configuration object of a run, validated at start-up.

The same YAML file drives the local (no-Kubernetes) mode and, rendered by the operator from an
RLSDRun spec, the distributed roles. Every model forbids unknown fields, so a typo fails at once
with its dotted path and the fields that are allowed there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlsd_contracts.wire import SERVED_MODEL_NAME

DEFAULT_TEACHER_TEMPLATE = (
    "{question}\n\n"
    "Here is a reference solution to this problem:\n"
    "{reference}\n\n"
    "After reading the reference solution above, solve the problem yourself in your own way."
)


# Maxima of counts and sizes: what a real cluster could need, and no more (the operator's RLSDRun CRD
# has the same bounds on the fields it shares; tests/operator/test_contract.py compares them).
MAX_STEPS = 10_000_000
MAX_TOKENS = 1_048_576
MAX_PATH = 4096
MAX_NAME = 256
# Batches the planner may generate ahead of the learner (rollout.max_staleness).
MAX_STALENESS = 8


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names every bad field and its fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Section):
    name: str = "rlsd-run"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    output_dir: str = "runs/rlsd-run"
    total_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 100


class ModelSection(_Section):
    # A Hugging Face causal-LM directory or hub id, or "embedded" for the tiny model built locally.
    path: Annotated[str, Field(max_length=MAX_PATH)] = "embedded"
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False


class EmbeddedTaskSection(_Section):
    """The synthetic verifiable reasoning task shipped with the embedded default."""

    num_train: Annotated[int, Field(ge=1)] = 20000
    num_eval: Annotated[int, Field(ge=1)] = 256
    min_terms: Annotated[int, Field(ge=2)] = 3
    max_terms: Annotated[int, Field(ge=2)] = 6
    max_operand: Annotated[int, Field(ge=1)] = 9

    @model_validator(mode="after")
    def _terms_ordered(self) -> EmbeddedTaskSection:
        if self.max_terms < self.min_terms:
            raise ValueError("max_terms must be >= min_terms")
        return self


class DataSourceSection(_Section):
    kind: Literal["jsonl", "parquet", "hf", "embedded"] = "embedded"
    # File path for jsonl/parquet; dataset name or saved-to-disk directory for hf.
    path: Annotated[str, Field(max_length=MAX_PATH)] | None = None
    split: Annotated[str, Field(max_length=MAX_NAME)] = "train"
    question_field: Annotated[str, Field(max_length=MAX_NAME)] = "question"
    answer_field: Annotated[str, Field(max_length=MAX_NAME)] = "answer"
    reference_field: Annotated[str, Field(max_length=MAX_NAME)] = "reference"

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataSourceSection:
        if self.kind != "embedded" and not self.path:
            raise ValueError(f"path is required when kind is {self.kind!r}")
        return self


class DataSection(_Section):
    train: DataSourceSection = DataSourceSection()
    eval: DataSourceSection | None = DataSourceSection(split="eval")
    embedded: EmbeddedTaskSection = EmbeddedTaskSection()
    max_prompt_tokens: Annotated[int, Field(ge=8, le=MAX_TOKENS)] = 512


class LambdaSchedule(_Section):
    """lam(step): warm-up at `initial`, then linear decay to `final` over `decay_steps` (RLSD.md)."""

    kind: Literal["linear", "constant"] = "linear"
    initial: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    final: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 0
    decay_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 60


class AlgorithmSection(_Section):
    name: Literal["rlsd", "grpo", "opsd", "grpo+opsd"] = "rlsd"
    group_size: Annotated[int, Field(ge=2, le=1024)] = 8
    lam: LambdaSchedule = LambdaSchedule()
    eps_w: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    clip_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    clip_high: Annotated[float, Field(gt=0.0)] = 0.28
    dual_clip: Annotated[float, Field(gt=1.0)] | None = 3.0
    advantage_eps: Annotated[float, Field(gt=0.0)] = 1e-6
    kl_coef: Annotated[float, Field(ge=0.0)] = 0.0
    entropy_coef: Annotated[float, Field(ge=0.0)] = 0.0
    # Weight of the OPSD term in grpo+opsd.
    opsd_coef: Annotated[float, Field(ge=0.0)] = 1.0
    ppo_epochs: Annotated[int, Field(ge=1)] = 1
    # Truncated importance weight (decoupled PPO with TIS; algorithms.py): the tokens it applies to have
    # their loss scaled by min(pi_learner / pi_rollout, importance_cap).
    importance_cap: Annotated[float, Field(ge=1.0, le=100.0)] = 2.0
    # Which responses get it: "stale" those of an older policy (rollout.max_staleness >= 1); "all" every
    # response, which also corrects the rollout engine's numerics against the learner's (vLLM's bf16
    # kernels, batching), as TRL, verl, AReaL and prime-rl do; "auto": "all" with remote rollout
    # servers, "stale" with the learner's own sampler (the same numerics: on-policy runs bit for bit).
    importance_correction: Literal["auto", "stale", "all"] = "auto"


class OptimSection(_Section):
    lr: Annotated[float, Field(gt=0.0)] = 1e-6
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: Annotated[float, Field(gt=0.0)] = 1.0
    # Steps (not optimizer updates: a step makes algorithm.ppo_epochs of them) over which the learning
    # rate rises linearly to `lr`.
    warmup_steps: Annotated[int, Field(ge=0)] = 0


class SamplingSection(_Section):
    # At most 2, as vLLM allows (SamplingParams). Every other sampling control is off: the learner's
    # ratios assume the full distribution at this temperature and top_p.
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 4096


class WeightTransferSection(_Section):
    """How new policy weights reach rollout/teacher servers (vLLM's RL routes; weights/wire.py)."""

    # nccl: vLLM's native broadcast (vLLM servers, GPU); gloo: our CPU servers' own backend (vLLM has
    # none); filesystem: safetensors in `shared_dir` plus vLLM's in-place reload (both servers), for
    # clusters where NCCL cannot cross pods.
    backend: Literal["nccl", "gloo", "filesystem"] = "nccl"
    # Address the servers use to reach learner rank 0 (its pod IP or Service name in a cluster).
    host: str = "127.0.0.1"
    # Port of the transfer rendezvous on learner rank 0; 0 picks a free one.
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    shared_dir: str | None = None

    @model_validator(mode="after")
    def _shared_dir_when_needed(self) -> WeightTransferSection:
        if self.backend == "filesystem" and not self.shared_dir:
            raise ValueError("shared_dir (a directory every server can read) is required for 'filesystem'")
        return self


class ServersSection(_Section):
    """Remote replicas of one role; requests are balanced over the healthy ones and retried."""

    urls: list[str] = []
    # Name the servers serve the model under (vLLM's --served-model-name).
    model_name: str = SERVED_MODEL_NAME
    request_timeout_s: Annotated[float, Field(gt=0.0)] = 600.0
    # A weight push that has not ended by then (a server stopped answering mid-way: with NCCL its
    # worker never returns) is abandoned and tried again without the servers that do not answer.
    # The operator's liveness probe of a server tolerates a stall this long before replacing it.
    weight_push_timeout_s: Annotated[float, Field(gt=0.0)] = 300.0
    # More tries of a request on other replicas, and of a push that failed with every server still
    # live (one that failed because a server was lost goes on with the others at no cost).
    max_retries: Annotated[int, Field(ge=0)] = 2
    weight_transfer: WeightTransferSection = WeightTransferSection()


class DynamicSamplingSection(_Section):
    """DAPO's dynamic sampling: groups whose rewards are all equal carry no advantage; drop them and
    sample more prompts until the step's batch is full, for at most `max_rounds` extra rounds (then the
    step keeps the dropped groups it needs to stay full)."""

    enabled: bool = False
    max_rounds: Annotated[int, Field(ge=1, le=64)] = 3


class RolloutSection(_Section):
    # local: an in-process engine on learner rank 0; remote: vLLM (or our CPU server) at `servers`.
    backend: Literal["local", "remote"] = "local"
    servers: ServersSection = ServersSection()
    prompts_per_step: Annotated[int, Field(ge=1, le=65536)] = 256
    sampling: SamplingSection = SamplingSection()
    # Responses generated per forward batch by the local engine (bounds its memory).
    max_batch_size: Annotated[int, Field(ge=1)] = 256
    # Batches generated ahead of the learner: 0 is on-policy (generate, then learn); k >= 1 lets the
    # planner generate step s with the policy of step s - k while the learners train, importance
    # weighted (algorithm.importance_cap).
    max_staleness: Annotated[int, Field(ge=0, le=MAX_STALENESS)] = 0
    dynamic_sampling: DynamicSamplingSection = DynamicSamplingSection()

    @model_validator(mode="after")
    def _servers_when_remote(self) -> RolloutSection:
        if self.backend == "remote" and not self.servers.urls:
            raise ValueError("servers.urls must list at least one rollout server when backend is 'remote'")
        return self


class TeacherSection(_Section):
    mode: Literal["frozen", "live"] = "frozen"
    # Frozen teacher is overwritten with the current policy every `sync_interval` steps.
    sync_interval: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 20
    template: str = DEFAULT_TEACHER_TEMPLATE
    max_reference_tokens: Annotated[int, Field(ge=1)] = 2048
    # colocated: the learners score with one extra no-grad forward (default for small runs);
    # remote: teacher servers at `servers` score, so large runs scale the teacher apart.
    placement: Literal["colocated", "remote"] = "colocated"
    servers: ServersSection = ServersSection()

    @model_validator(mode="after")
    def _template_placeholders(self) -> TeacherSection:
        for placeholder in ("{question}", "{reference}"):
            if placeholder not in self.template:
                raise ValueError(f"template must contain {placeholder}")
        if self.placement == "remote" and not self.servers.urls:
            raise ValueError("servers.urls must list at least one teacher server when placement is 'remote'")
        if self.placement == "remote" and self.servers.weight_transfer.backend == "nccl":
            raise ValueError(
                "servers.weight_transfer.backend: the teacher servers are ours (rlsd-trainer serve teacher), "
                "which receive over gloo or filesystem; nccl is vLLM's"
            )
        return self


class RewardSection(_Section):
    verifier: Literal["exact", "numeric", "math", "callable"] = "math"
    # "package.module:function" with signature (response: str, answer: str) -> float; for `callable`.
    callable: Annotated[str, Field(max_length=512)] | None = None
    timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 5.0
    workers: Annotated[int, Field(ge=1, le=1024)] = 2

    @model_validator(mode="after")
    def _callable_when_needed(self) -> RewardSection:
        if self.verifier == "callable" and not self.callable:
            raise ValueError("callable ('package.module:function') is required when verifier is 'callable'")
        if self.callable and ":" not in self.callable:
            raise ValueError("callable must look like 'package.module:function'")
        return self


class WarmupSection(_Section):
    """Supervised warm-up on (question, reference) rows before RL; 0 steps skips it."""

    steps: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(ge=1)] = 64
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    # Share of warm-up rows shown in the teacher's privileged format, so a model trained from
    # scratch learns to read a reference (a pretrained LLM already can).
    privileged_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # Share of (non-privileged) rows whose target is the bare final answer instead of the worked
    # solution: the warmed-up policy then mixes a reliable and an unreliable way of answering, and RL
    # has to discover which one the verifier rewards.
    direct_answer_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class LearnerSection(_Section):
    # Real tokens per micro-batch (prompt + response, packed without padding); gradients accumulate
    # across micro-batches.
    micro_batch_tokens: Annotated[int, Field(ge=64, le=16 * MAX_TOKENS)] = 16384
    # Tokens per chunk of the output projection, bounding the float32 logits held at once.
    logprob_chunk_tokens: Annotated[int, Field(ge=16)] = 256
    # Recompute each decoder layer's activations in backward instead of keeping them.
    activation_checkpointing: bool = False
    # Parameter dtype of the sharded forward/backward on GPU (gradients reduce in float32).
    mixed_precision: Literal["bfloat16", "float32"] = "bfloat16"
    # Seconds a collective may wait for the other ranks before the job fails.
    collective_timeout_s: Annotated[float, Field(gt=0.0)] = 1800.0


class CheckpointSection(_Section):
    every: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 20
    keep_last: Annotated[int, Field(ge=1, le=1000)] = 3
    # Write in a background thread while training goes on; committed at the next step boundary.
    async_save: bool = False
    # After SIGTERM: seconds to reach the end of the step and save before giving up (exit 76).
    # Keep it below the pod's terminationGracePeriodSeconds.
    preemption_grace_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 120.0


class WandbSection(_Section):
    project: Annotated[str, Field(min_length=1, max_length=MAX_NAME)] = "rlsd"
    entity: Annotated[str, Field(min_length=1, max_length=MAX_NAME)] | None = None
    # offline: written under <output_dir>/wandb only, for a later `wandb sync`.
    mode: Literal["online", "offline"] = "online"


class MlflowSection(_Section):
    # Default: a file store in <output_dir>/mlruns.
    tracking_uri: Annotated[str, Field(min_length=1, max_length=MAX_PATH)] | None = None
    experiment: Annotated[str, Field(min_length=1, max_length=MAX_NAME)] = "rlsd"


class TensorBoardSection(_Section):
    # Default: <output_dir>/tensorboard.
    log_dir: Annotated[str, Field(min_length=1, max_length=MAX_PATH)] | None = None


class MetricsSection(_Section):
    # Experiment trackers that get every step's values and the resolved config (optional extras).
    trackers: tuple[Literal["wandb", "mlflow", "tensorboard"], ...] = ()
    wandb: WandbSection = WandbSection()
    mlflow: MlflowSection = MlflowSection()
    tensorboard: TensorBoardSection = TensorBoardSection()
    # Port of the Prometheus /metrics endpoint; 0 picks a free port, null disables it.
    prometheus_port: Annotated[int, Field(ge=0, le=65535)] | None = 0
    # Address it listens on: loopback on a laptop; 0.0.0.0 in a pod, so Prometheus and the operator
    # can scrape it.
    prometheus_host: str = "127.0.0.1"
    console_every: Annotated[int, Field(ge=1)] = 10
    progress_bar: bool = True

    @field_validator("trackers")
    @classmethod
    def _trackers_once(cls, trackers: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(trackers)) != len(trackers):
            raise ValueError(f"lists a tracker twice: {list(trackers)}")
        return trackers


class EvalSection(_Section):
    every: Annotated[int, Field(ge=1)] = 20
    max_examples: Annotated[int, Field(ge=1)] = 256
    # Held-out accuracy is measured with greedy decoding unless a temperature is given.
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    max_new_tokens: Annotated[int, Field(ge=1)] = 4096


class RunConfig(_Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    algorithm: AlgorithmSection = AlgorithmSection()
    optim: OptimSection = OptimSection()
    rollout: RolloutSection = RolloutSection()
    teacher: TeacherSection = TeacherSection()
    reward: RewardSection = RewardSection()
    warmup: WarmupSection = WarmupSection()
    learner: LearnerSection = LearnerSection()
    checkpoint: CheckpointSection = CheckpointSection()
    metrics: MetricsSection = MetricsSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _embedded_pairs(self) -> RunConfig:
        embedded_data = self.data.train.kind == "embedded"
        if (self.model.path == "embedded") != embedded_data:
            raise ValueError(
                "model.path 'embedded' and data.train.kind 'embedded' go together: the embedded model's "
                "tokenizer is built for the embedded task; set both or neither"
            )
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        allowed = _allowed_fields(root, error["loc"][:-1])
        message = f"unknown field; allowed fields here: {', '.join(allowed)}"
    return f"  {path}: {message}"


def _allowed_fields(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a raw mapping into a RunConfig or raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, RunConfig) for error in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, apply `section.field=value` overrides, and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides or []:
        apply_override(raw, override)
    return parse_config(raw, str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML (so 3, 0.5, true work),
    falling back to the raw string when it is not valid YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected section.field=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError:
        # Not a YAML scalar (a template such as "{question} ..."): keep it as the string it is.
        node[leaf] = value


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
