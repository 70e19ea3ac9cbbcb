"""Our GRPO step against TRL's GRPOTrainer: same model, same data, same batch shape, one run.

Setting (both sides in this one process, `torch.set_num_threads(2)`, taking turns step by step:
TRL trains in a thread of its own whose step callbacks wait for their turn, and the side that goes
first alternates, so a change in the machine's load falls on both alike)
    * Models (`--shapes`, both by default, each measured on both sides in turn):
      `embedded`: the embedded tiny Qwen3 model (`rlsd_trainer.data.embedded.build_model_dir`: hidden 128,
      4 layers), given a short supervised warm-up (`rlsd_trainer.training.warmup.supervised_warmup`,
      `--warmup-sft-steps`, default 150, batch 64, lr 2e-3: about 90 s on 2 cores; 60 steps leave
      the reward near 0.01) so that rewards are not all zero;
      `qwen3-512x4`: a larger random-initialised Qwen3 (hidden 512, 4 layers, 8 heads, 4 KV heads,
      head_dim 64, MLP 1536, 12.6M parameters) with the embedded tokenizer and chat template. A
      random tied-embedding model favours tokens already in its context, among them the chat
      template's end-of-turn token, so some responses stop early (measured: mean about 57 of 64,
      80% reach the limit, so padding is a small part of TRL's work on this shape); rewards stay 0,
      which changes neither side's work.
      Each model is saved once and both trainers load that very directory, so they start from the
      same weights. float32 on CPU.
    * Data: train rows of the embedded arithmetic task (`rlsd_trainer.data.embedded.generate_examples`),
      written to a JSONL file for our trainer. The question becomes a one-turn user message under
      the tokenizer's chat template on both sides (ours: `models.encode_prompt`; TRL: conversational
      `prompt` column). Both sides see the same prompts in the same order: the TRL dataset is laid
      out in the order our trainer's `ResumableSampler` draws rows, and TRL's shuffling is off.
    * Batch: `--prompts` prompts (default 16) x `--group` completions (default 8) per optimizer step;
      at most `--max-new-tokens` (64) new tokens, temperature 1.0, top-p 1.0; AdamW lr 1e-4,
      weight decay 0.01, grad clip 1.0, constant LR; GRPO advantages normalised by the group std; no
      KL (beta 0), no entropy bonus, one PPO epoch; token-mean loss over the whole batch (ours:
      `algorithms.token_mean`; TRL: `loss_type="dapo"`); clip 0.2 / 0.28 (on-policy, so the ratio is
      1 and clipping does not act). Reward: `rlsd_trainer.rewards.verifiers.numeric_match` on both sides.
    * Ours: `rlsd_trainer.training.trainer.Trainer` (algorithm `grpo`, eval off, no checkpoints, no
      Prometheus), stepped with `trainer.train_step()`, as `run()` does.
      A step = rollout (our KV-cache sampler on its own copy of the weights) + reward + log-probs,
      loss, backward, optimizer step + weight push to the sampler.
    * TRL: `GRPOTrainer`/`GRPOConfig` with `per_device_train_batch_size = prompts x group`,
      `gradient_accumulation_steps = 1` (so one generation batch of the same size per optimizer step,
      generated with `model.generate`), `num_generations = group`, `use_vllm=False`, `use_cpu=True`,
      bf16/fp16 off, gradient checkpointing off (TRL defaults it on; off is faster for a model this
      small), no logging, saving, evaluation or reporting. A step = its `on_step_begin` ->
      `on_step_end` callback interval (generation, reward, loss, backward, optimizer step).

Throughput (the same definition for both sides)
    tokens/s of a step = (prompt tokens + completion tokens of all rollouts of that step) / step
    wall time, averaged over the timed steps (and of the median step, which a busy machine disturbs
    less); the first `--warmup-steps` (default 2) of each side are run but not timed. Tokens are
    counted from what was actually generated: on our side by wrapping the rollout engine's
    `generate` (prompt ids x n and the returned completion ids); on TRL's side in the reward
    function from the `completion_ids` it receives and the chat-templated prompts, and cross-checked
    against TRL's own `state.num_input_tokens_seen` (prompt + completion tokens it counts per
    generation). Completion tokens include the stop token and no padding on both sides.

Learner efficiency (ours)
    The learn phase (`time_learn_seconds` of `train_step`: log-probs, loss, backward, optimizer
    step) against its model FLOPs counted on the real tokens it runs, each prompt once per group as
    the learner packs it (`harness.model_flops`: 6 x body parameters x tokens + 6 x V x h x response
    tokens + 12 x L x H x d x query-key pairs, a prompt with itself and a response with its prompt
    and itself), as GFLOP/s and as a share of this machine's float32 matmul peak with the same
    threads (`harness.matmul_peak_gflops`, 2048^3 products, measured in the same run).

Profile (ours): one more step under the torch profiler: the share of CPU time in matrix products
    (`MATMUL_OPS`), the most expensive ops, and per phase of the step (the trainer's `StepTimer`
    marks each as a profiler range) its wall time and its seconds in matrix products, to show what
    bounds the step.

Bound (ours): the seconds our step would take with its learn phase and its rollout at the matmul
    peak (learn FLOPs as above; the rollout's one forward over the same tokens is a third of them),
    the other phases as measured; TRL's mean step over that is the highest ratio this hardware
    allows unless TRL gets slower.

Output: a table per model on stdout, `benchmarks/results/peer_trl.json` and
`benchmarks/results/peer_trl.png`. Targets: ours/TRL tokens/s >= 2 on both models; learn phase at
>= 50% of the matmul peak.

Running it
    TRL is needed by this benchmark only and is not a dependency of the trainer, so this module does
    not import it at module level. Install it into a separate virtual environment:

        python3 -m venv .venv-peer
        .venv-peer/bin/pip install -e trainer/contracts -e trainer trl   # pip's wheel cache: torch is quick
        .venv-peer/bin/python benchmarks/peer_trl.py [--steps 10 ...]

    or simply `benchmarks/peer_trl.sh [args]`, which creates `.venv-peer` when missing (pinning
    torch and transformers to the versions of `.venv`) and runs this script with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import RESULTS, TASK_SHAPES, load_average, matmul_peak_gflops, save_figure, task_model_dir


class CpuWatch:
    """CPU time other processes used while a side ran: /proc/stat minus this process and its reaped children.

    On 2 cores a second busy process makes torch's worker threads wait on each other and can slow a
    step down many times over, so each side reports how many cores others kept busy meanwhile.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as handle:
                fields = [int(x) for x in handle.readline().split()[1:]]
        except OSError:
            return time.perf_counter(), float("nan"), 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / ticks
        own = sum(
            getattr(resource.getrusage(who), attr)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for attr in ("ru_utime", "ru_stime")
        )
        return time.perf_counter(), busy, own

    def foreign_cores(self) -> float:
        """Mean number of cores busy with other processes since construction."""
        wall0, busy0, own0 = self.start
        wall1, busy1, own1 = self._sample()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9)


@dataclass
class StepRecord:
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    reward_mean: float
    timed: bool
    # TRL only: tokens by TRL's own count (state.num_input_tokens_seen difference).
    framework_tokens: int | None = None
    # Seconds per phase: ours as `train_step` reports them; TRL's generation and the rest.
    phases: dict[str, float] | None = None
    # Cores other processes kept busy during the step.
    foreign_cores: float = 0.0
    # Ours only: the tokens our learner runs (each prompt once per group, every response) and the
    # attention's query-key pairs (a prompt with itself, a response with its prompt and itself).
    learner_tokens: int | None = None
    attention_pairs: int | None = None

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass
class SideResult:
    name: str
    steps: list[StepRecord] = field(default_factory=list)
    setup_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def timed(self) -> list[StepRecord]:
        return [s for s in self.steps if s.timed]

    def phase_seconds(self) -> dict[str, float]:
        """Mean seconds per phase over the timed steps."""
        timed = [s.phases for s in self.timed() if s.phases]
        names = dict.fromkeys(name for phases in timed for name in phases)
        return {name: statistics.fmean(p.get(name, 0.0) for p in timed) for name in names}

    def summary(self) -> dict[str, float]:
        timed = self.timed()
        return {
            "tokens_per_second": statistics.fmean(s.tokens_per_second for s in timed),
            "tokens_per_second_median": statistics.median(s.tokens_per_second for s in timed),
            "step_seconds": statistics.fmean(s.seconds for s in timed),
            "tokens_per_step": statistics.fmean(s.tokens for s in timed),
            "completion_tokens_per_step": statistics.fmean(s.completion_tokens for s in timed),
            "reward_mean": statistics.fmean(s.reward_mean for s in timed),
            "timed_steps": len(timed),
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        default="embedded,qwen3-512x4",
        help=f"models, comma-separated: {', '.join(TASK_SHAPES)}",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps run first on each side")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (group size)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--warmup-sft-steps", type=int, default=150, help="supervised warm-up of the start model"
    )
    parser.add_argument("--num-train", type=int, default=2000, help="train rows generated")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--order", default="ours,trl", help="which side goes first on even steps, e.g. 'trl,ours'"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="keep the model, data and run files here (default: temp)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "peer_trl.json", help="JSON results")
    parser.add_argument("--plot", type=Path, default=RESULTS / "peer_trl.png", help="PNG ('' skips)")
    return parser


# ---- common set-up ------------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, list[Any]]:
    """The train JSONL, and its rows in the order our sampler draws them."""
    from rlsd_contracts.config import EmbeddedTaskSection
    from rlsd_trainer.data.embedded import generate_examples
    from rlsd_trainer.data.sampler import ResumableSampler

    rows = generate_examples(EmbeddedTaskSection(num_train=args.num_train), "train", args.seed)
    jsonl = work / "train.jsonl"
    with jsonl.open("w") as handle:
        for row in rows:
            handle.write(
                json.dumps({"question": row.question, "answer": row.answer, "reference": row.reference})
            )
            handle.write("\n")
    # The rows our trainer will draw, step by step (its sampler is ResumableSampler(len, run.seed)).
    sampler = ResumableSampler(len(rows), args.seed)
    total = (args.warmup_steps + args.steps) * args.prompts
    return jsonl, [rows[i] for i in sampler.next_indices(total)]


# ---- our trainer --------------------------------------------------------------------------------


class OursSide:
    """Our trainer, one `train_step` per `step()`."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, jsonl: Path, work: Path) -> None:
        from rlsd_contracts.config import MAX_STEPS, parse_config
        from rlsd_trainer.training.trainer import Trainer

        self.args = args
        setup_started = time.perf_counter()
        big = MAX_STEPS  # no checkpoint, no end of run inside the benchmark
        config = parse_config(
            {
                "run": {
                    "name": "peer-ours",
                    "seed": args.seed,
                    "output_dir": str(work / f"ours-{model_dir.name}"),
                    "total_steps": big,
                },
                "model": {"path": str(model_dir)},
                "data": {"train": {"kind": "jsonl", "path": str(jsonl)}, "eval": None},
                "algorithm": {"name": "grpo", "group_size": args.group},
                "rollout": {
                    "prompts_per_step": args.prompts,
                    "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens},
                },
                "optim": {"lr": args.lr, "weight_decay": 0.01, "grad_clip": 1.0, "warmup_steps": 0},
                "reward": {"verifier": "numeric"},
                "warmup": {"steps": 0},
                "checkpoint": {"every": big},
                "metrics": {"prometheus_port": None, "progress_bar": False},
            },
            "peer_trl.py",
        )
        self.trainer = Trainer(config)
        self.side = SideResult("ours", notes={"micro_batch_tokens": config.learner.micro_batch_tokens})
        # Count the tokens of every rollout from what the engine was given and returned.
        self.counts = {"prompt": 0, "completion": 0, "learner": 0, "pairs": 0}
        assert self.trainer.plans is not None
        engine = self.trainer.plans.planner.engine
        generate = engine.generate

        def counting_generate(prompts, params):  # type: ignore[no-untyped-def]
            groups = generate(prompts, params)
            completions = sum(len(c.token_ids) for group in groups for c in group)
            self.counts["prompt"] += sum(len(p) for p in prompts) * params.n
            self.counts["completion"] += completions
            self.counts["learner"] += sum(len(p) for p in prompts) + completions
            self.counts["pairs"] += sum(
                len(p) ** 2 + sum(len(c.token_ids) * (len(p) + len(c.token_ids)) for c in group)
                for p, group in zip(prompts, groups, strict=True)
            )
            return groups

        engine.generate = counting_generate  # type: ignore[method-assign]
        self.side.setup_seconds = time.perf_counter() - setup_started

    def step(self, index: int) -> StepRecord:
        self.counts.update(prompt=0, completion=0, learner=0, pairs=0)
        started = time.perf_counter()
        values = self.trainer.train_step()
        seconds = time.perf_counter() - started
        return StepRecord(
            seconds=seconds,
            prompt_tokens=self.counts["prompt"],
            completion_tokens=self.counts["completion"],
            reward_mean=values["reward_mean"],
            timed=index >= self.args.warmup_steps,
            phases={
                key.removeprefix("time_").removesuffix("_seconds"): value
                for key, value in values.items()
                # The wait for the planner (on-policy: its rollout, reward and teacher phases) is not
                # a phase of its own.
                if key.startswith("time_") and key != "time_plan_wait_seconds"
            },
            learner_tokens=self.counts["learner"],
            attention_pairs=self.counts["pairs"],
        )

    def finish(self) -> None:
        self.side.notes["profile"] = profile_step(self.trainer.train_step)
        self.trainer.close()
        assert self.trainer.metrics is not None
        self.trainer.metrics.close()


# aten ops that are matrix products (a Linear layer's forward and backward, attention's kernels).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::_scaled_dot_product")


def profile_step(step: Any) -> dict[str, Any]:
    """One more step under the torch profiler: the share of CPU time in matrix products (the part a
    faster implementation cannot shrink at equal FLOPs), the ops that took the most time, and per
    phase of the step (`StepTimer`'s profiler ranges) its wall time and the seconds in matrix products
    (the rest being elementwise ops, copies and Python between ops)."""
    from torch.profiler import ProfilerActivity, profile

    from rlsd_trainer.training.timing import StepTimer

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    # Ops only: a phase's range has the Python between its ops as self time (counted per phase below).
    events = [e for e in profiler.key_averages() if not e.key.startswith(StepTimer.PHASE_PREFIX)]
    total = sum(event.self_cpu_time_total for event in events)
    matmul = sum(event.self_cpu_time_total for event in events if event.key.startswith(MATMUL_OPS))
    top = sorted(events, key=lambda event: -event.self_cpu_time_total)[:12]
    phases: dict[str, dict[str, float]] = {}
    for event in profiler.events():
        if not event.name.startswith(StepTimer.PHASE_PREFIX):
            continue
        inside, pending = [], list(event.cpu_children)
        while pending:
            child = pending.pop()
            inside.append(child)
            pending.extend(child.cpu_children)
        wall = event.time_range.elapsed_us() / 1e6
        ops = sum(e.self_cpu_time_total for e in inside) / 1e6
        products = sum(e.self_cpu_time_total for e in inside if e.name.startswith(MATMUL_OPS)) / 1e6
        phases[event.name.removeprefix(StepTimer.PHASE_PREFIX)] = {
            "wall_seconds": wall,
            "op_seconds": ops,
            "matmul_seconds": products,
            "matmul_share_of_wall": products / wall if wall else 0.0,
        }
    return {
        "cpu_seconds": total / 1e6,
        "matmul_share": matmul / total,
        "phases": phases,
        "top_ops": [
            {"op": event.key, "seconds": event.self_cpu_time_total / 1e6, "calls": event.count}
            for event in top
        ],
    }


# ---- TRL ----------------------------------------------------------------------------------------


class TrlSide:
    """TRL's GRPOTrainer, training in a thread of its own whose step callbacks wait for `step()`, so
    that its optimizer steps and ours take turns on the machine."""

    def __init__(
        self, args: argparse.Namespace, model_dir: Path, ordered_rows: list[Any], work: Path
    ) -> None:
        self.args = args
        self.records: list[StepRecord] = []
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error: BaseException | None = None
        trainer, self.side = _trl_trainer(args, model_dir, ordered_rows, work, self)

        def train() -> None:
            import torch

            torch.set_num_threads(args.threads)  # OpenMP's thread count is kept per calling thread
            try:
                trainer.train()
            except BaseException as error:  # handed to the main thread
                self.error = error
                self.done.release()

        self.thread = threading.Thread(target=train, name="trl", daemon=True)
        self.thread.start()

    def step(self, index: int) -> StepRecord:
        self.go.release()
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("TRL's training failed") from self.error
        return self.records[index]

    def finish(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError("TRL's training failed") from self.error
        mismatched = [i for i, s in enumerate(self.records) if s.framework_tokens != s.tokens]
        self.side.notes["token_count_matches_trl"] = not mismatched
        if mismatched:
            print(f"warning: TRL's own token count differs from ours at steps {mismatched}")


def _trl_trainer(
    args: argparse.Namespace, model_dir: Path, ordered_rows: list[Any], work: Path, gate: TrlSide
) -> tuple[Any, SideResult]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlsd_trainer.model.loading import encode_prompt
    from rlsd_trainer.rewards.verifiers import numeric_match

    torch.set_num_threads(args.threads)
    setup_started = time.perf_counter()
    side = SideResult("trl", notes={"trl_version": trl.__version__})
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": row.question}], "answer": row.answer}
            for row in ordered_rows
        ]
    )
    batch = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(work / f"trl-{model_dir.name}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        scale_rewards="group",
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_steps=args.warmup_steps + args.steps,
        shuffle_dataset=False,
        seed=args.seed,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )

    current: dict[str, Any] = {}

    def numeric_reward(prompts, completions, completion_ids, answer, **kwargs):  # type: ignore[no-untyped-def]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [numeric_match(text, gold) for text, gold in zip(texts, answer, strict=True)]
        current["completion_tokens"] += sum(len(ids) for ids in completion_ids)
        current["prompt_tokens"] += sum(len(encode_prompt(tokenizer, p[-1]["content"])) for p in prompts)
        current["rewards"].extend(scores)
        return scores

    class StepTimer(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            gate.go.acquire()  # the main thread's turn is over
            current.update(
                prompt_tokens=0,
                completion_tokens=0,
                rewards=[],
                seen=state.num_input_tokens_seen,
                generate=0.0,
            )
            current["start"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            seconds = time.perf_counter() - current["start"]
            index = len(gate.records)
            gate.records.append(
                StepRecord(
                    seconds=seconds,
                    prompt_tokens=current["prompt_tokens"],
                    completion_tokens=current["completion_tokens"],
                    reward_mean=statistics.fmean(current["rewards"]) if current["rewards"] else float("nan"),
                    timed=index >= args.warmup_steps,
                    framework_tokens=int(state.num_input_tokens_seen - current["seen"]),
                    phases={"generate": current["generate"], "rest": seconds - current["generate"]},
                )
            )
            gate.done.release()

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[numeric_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    # Time TRL's generation too (a private method; skipped if it is renamed), for the phase split.
    generate_single_turn = getattr(trainer, "_generate_single_turn", None)
    if generate_single_turn is not None:

        def timed_generate(*a, **k):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return generate_single_turn(*a, **k)
            finally:
                current["generate"] = current.get("generate", 0.0) + time.perf_counter() - started

        trainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    side.setup_seconds = time.perf_counter() - setup_started
    return trainer, side


# ---- report -------------------------------------------------------------------------------------


def _progress(name: str, index: int, args: argparse.Namespace, step: StepRecord) -> None:
    kind = "timed" if step.timed else "warm-up"
    print(
        f"  {name:<4} step {index + 1:>2}/{args.warmup_steps + args.steps} ({kind}): {step.seconds:6.2f} s, "
        f"{step.prompt_tokens} + {step.completion_tokens} tokens, {step.tokens_per_second:7.0f} tok/s, "
        f"reward {step.reward_mean:.3f}"
        + ("".join(f", {k} {v:.2f} s" for k, v in step.phases.items()) if step.phases else ""),
        flush=True,
    )


def plot(results: dict[str, dict[str, SideResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    colours = {"ours": "#4c72b0", "trl": "#dd8452"}
    for column, (shape, sides) in enumerate(results.items()):
        steps, bars = axes[0][column], axes[1][column]
        for name, side in sides.items():
            timed = side.timed()
            steps.plot(
                range(1, len(timed) + 1),
                [s.tokens_per_second for s in timed],
                "o-",
                label=name,
                color=colours[name],
            )
        steps.set_title(shape, fontsize=10)
        steps.set_xlabel("timed step")
        steps.set_ylabel("tokens/s (prompt + completion)")
        steps.set_ylim(bottom=0)
        steps.legend()
        names = list(sides)
        means = [sides[n].summary()["tokens_per_second"] for n in names]
        drawn = bars.bar(names, means, color=[colours[n] for n in names])
        for bar, name in zip(drawn, names, strict=True):
            summary = sides[name].summary()
            bars.annotate(
                f"{summary['tokens_per_second']:.0f} tok/s\n{summary['step_seconds']:.2f} s/step",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        bars.set_ylim(0, max(means) * 1.25)
        bars.set_title(
            f"mean over timed steps: ours/TRL = {means[names.index('ours')] / means[names.index('trl')]:.2f}",
            fontsize=10,
        )
    fig.suptitle("GRPO step throughput, ours vs TRL GRPOTrainer, CPU", fontsize=11)
    save_figure(fig, path)


def learner_efficiency(side: SideResult, model_dir: Path, peak: float) -> dict[str, float]:
    """Ours: model GFLOP/s of the learn phase on real tokens, and its share of the matmul peak; and
    the floor of our step: the seconds its learn phase (forward + backward) and its rollout (one
    forward of each prompt and generated token, a third of the learner's FLOPs) would take at that
    peak, the rest of the step as measured."""
    from harness import model_flops, parameter_count, shape_of
    from transformers import AutoConfig

    shape = shape_of(AutoConfig.from_pretrained(model_dir))
    parameters = parameter_count(shape)
    timed = side.timed()
    flops = [
        model_flops(shape, parameters, s.learner_tokens or 0, s.completion_tokens, s.attention_pairs or 0)
        for s in timed
    ]
    seconds = [s.phases["learn"] for s in timed if s.phases]
    gflops = sum(flops) / sum(seconds) / 1e9
    learn_floor = statistics.fmean(flops) / 1e9 / peak
    phases = side.phase_seconds()
    rest = sum(phases.values()) - phases.get("learn", 0.0) - phases.get("rollout", 0.0)
    return {
        "learn_seconds": statistics.fmean(seconds),
        "learn_gflop_per_step": statistics.fmean(flops) / 1e9,
        "learn_gflops": gflops,
        "matmul_peak_gflops": peak,
        "share_of_peak": gflops / peak,
        "learn_seconds_at_peak": learn_floor,
        "rollout_seconds": phases.get("rollout", 0.0),
        "rollout_seconds_at_peak": learn_floor / 3,
        "step_seconds_at_peak": learn_floor * 4 / 3 + rest,
    }


def report(
    args: argparse.Namespace, shape: str, sides: dict[str, SideResult], efficiency: dict[str, float]
) -> dict[str, Any]:
    ours, peer = sides["ours"].summary(), sides["trl"].summary()
    ratio = ours["tokens_per_second"] / peer["tokens_per_second"]
    median_ratio = ours["tokens_per_second_median"] / peer["tokens_per_second_median"]
    print()
    print(
        f"{shape}: {args.prompts} prompts x {args.group} completions per step, max {args.max_new_tokens} new "
        f"tokens, {args.threads} threads; mean over {args.steps} timed steps after {args.warmup_steps} "
        "untimed"
    )
    header = f"{'':<24}{'ours':>12}{'TRL':>12}{'ours/TRL':>10}"
    print(header)
    print("-" * len(header))
    rows = [
        ("tokens/s", "tokens_per_second", ".0f"),
        ("tokens/s, median step", "tokens_per_second_median", ".0f"),
        ("step seconds", "step_seconds", ".2f"),
        ("tokens per step", "tokens_per_step", ".0f"),
        ("completion tokens/step", "completion_tokens_per_step", ".0f"),
        ("reward mean", "reward_mean", ".3f"),
    ]
    for label, key, fmt in rows:
        share = ours[key] / peer[key] if peer[key] else float("nan")
        print(f"{label:<24}{ours[key]:>12{fmt}}{peer[key]:>12{fmt}}{share:>10.2f}")
    print(
        "tokens/s = (prompt + completion tokens of all rollouts of the step) / step wall time, "
        "averaged over the timed steps"
    )
    for name, side in sides.items():
        split = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in side.phase_seconds().items())
        print(f"mean phase split, {name}: {split}")
    print(
        f"our learn phase: {efficiency['learn_gflop_per_step']:.1f} GFLOP on real tokens in "
        f"{efficiency['learn_seconds']:.2f} s = {efficiency['learn_gflops']:.1f} GFLOP/s, "
        f"{100 * efficiency['share_of_peak']:.0f}% of the float32 matmul peak "
        f"({efficiency['matmul_peak_gflops']:.1f} GFLOP/s, {args.threads} threads; target >= 50%)"
    )
    trl_step = peer["step_seconds"]
    floor = efficiency["step_seconds_at_peak"]
    print(
        f"our step at the matmul peak: learn {efficiency['learn_seconds_at_peak']:.2f} s + rollout "
        f"{efficiency['rollout_seconds_at_peak']:.2f} s + the rest as measured = {floor:.2f} s; TRL's "
        f"{trl_step:.2f} s step over that bounds ours/TRL at {trl_step / floor:.2f} "
        f"(our rollout runs {efficiency['rollout_seconds']:.2f} s)"
    )
    profile = sides["ours"].notes["profile"]
    print(
        f"profile of one more step of ours: {100 * profile['matmul_share']:.0f}% of "
        f"{profile['cpu_seconds']:.2f} CPU seconds in matrix products; top ops: "
        + ", ".join(f"{op['op']} {op['seconds']:.2f} s" for op in profile["top_ops"][:6])
    )
    print(
        "  by phase (wall under the profiler, share in matrix products): "
        + ", ".join(
            f"{name} {phase['wall_seconds']:.2f} s ({100 * phase['matmul_share_of_wall']:.0f}%)"
            for name, phase in profile["phases"].items()
            if phase["wall_seconds"] >= 0.01
        )
    )
    foreign = {name: side.notes.get("foreign_cpu_cores", float("nan")) for name, side in sides.items()}
    print(
        "cores kept busy by other processes during the timed steps: "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in foreign.items())
    )
    if any(cores > 0.2 for cores in foreign.values()):
        print("warning: other processes competed for the CPU; timings are not trustworthy, rerun when idle")
    print(
        f"throughput ratio ours/TRL = {ratio:.2f} (target >= 2: {'met' if ratio >= 2 else 'MISSED'}); "
        f"of the median steps {median_ratio:.2f}"
    )
    return {
        "ratio_ours_over_trl": ratio,
        "ratio_of_median_steps": median_ratio,
        "target_ratio": 2.0,
        "target_met": ratio >= 2,
        "learner_efficiency": efficiency,
        "ratio_bound_at_matmul_peak": trl_step / floor,
        "sides": {
            name: {
                "summary": side.summary(),
                "phase_seconds": side.phase_seconds(),
                "setup_seconds": side.setup_seconds,
                "notes": side.notes,
                "steps": [asdict(s) for s in side.steps],
            }
            for name, side in sides.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    order = [name.strip() for name in args.order.split(",")]
    if sorted(order) != ["ours", "trl"]:
        raise SystemExit("--order must name 'ours' and 'trl' once each")
    shapes = [name.strip() for name in args.shapes.split(",")]
    unknown = [name for name in shapes if name not in TASK_SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join(TASK_SHAPES)}")
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit(
            "TRL is not installed in this environment; run benchmarks/peer_trl.sh, which sets up .venv-peer "
            "(see this script's docstring)"
        ) from None
    import torch

    torch.set_num_threads(args.threads)
    load_start = load_average()
    peak = matmul_peak_gflops(args.threads)
    print(
        f"float32 matmul peak, {args.threads} threads: {peak:.1f} GFLOP/s; load average {load_start}",
        flush=True,
    )
    measured: dict[str, dict[str, SideResult]] = {}
    reports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        jsonl, ordered = prepare_data(args, work)
        for shape in shapes:
            model_dir = task_model_dir(work, shape, args.seed, args.warmup_sft_steps, args.num_train)
            print(f"{shape}: setting up both sides ...", flush=True)
            steppers = {
                "ours": OursSide(args, model_dir, jsonl, work),
                "trl": TrlSide(args, model_dir, ordered, work),
            }
            sides = {name: stepper.side for name, stepper in steppers.items()}
            for index in range(args.warmup_steps + args.steps):
                # The sides take turns step by step (who goes first alternates), so a change in the
                # machine's load falls on both alike.
                for name in order if index % 2 == 0 else order[::-1]:
                    watch = CpuWatch()
                    record = steppers[name].step(index)
                    record.foreign_cores = watch.foreign_cores()
                    sides[name].steps.append(record)
                    _progress(name, index, args, record)
            for stepper in steppers.values():
                stepper.finish()
            for side in sides.values():
                side.notes["foreign_cpu_cores"] = statistics.fmean(
                    step.foreign_cores for step in side.timed()
                )
            measured[shape] = sides
            reports[shape] = report(args, shape, sides, learner_efficiency(sides["ours"], model_dir, peak))
    results = {
        "setting": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "throughput_definition": "(prompt + completion tokens of all rollouts of a step) / step wall time, "
        "mean over timed steps",
        "load_average": {"start": load_start, "end": load_average()},
        "matmul_peak_gflops": peak,
        "shapes": reports,
    }
    print(f"load average at start {load_start}, at end {results['load_average']['end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if str(args.plot) not in ("", "."):
        plot(measured, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
