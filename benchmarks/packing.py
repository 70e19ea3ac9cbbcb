"""Padding-free learner and sampler, before vs after, and the attention layouts considered.

What is measured (one process, `--threads` torch threads, every comparison interleaved in one run)
    Models: the `harness.TASK_SHAPES` models of the peer benchmark (`embedded`: the embedded model
    after its 150-step supervised warm-up; `qwen3-512x4`: a random-initialised Qwen3, hidden 512,
    4 layers, with the embedded tokenizer), float32.

    1. Sampler: `LocalEngine.generate` of `--prompts` task prompts x n = `--group` samples of up to
       `--max-new-tokens` tokens (temperature 1, seed 7), now and as it was at commit `BEFORE` (the
       last one before this work; its `rollout.py` is loaded from git into this process, so both
       run side by side on the same weights). Generated tokens/s, median of `--repeats` calls
       after one untimed call each. Rows whose tokens differ between the two are counted (the same
       seed gives the same tokens, up to a float rounding that flips a draw).
    2. Learner: one forward + backward of the student log-probs with entropies (as the learner
       takes them) over one micro-batch: the sampler's responses to the same prompts (their real,
       long-tailed lengths) with their prompts, under these layouts:
       * `padded (before)`: `response_logprobs` at `BEFORE` (rows right-padded to the longest);
       * `packed, dense block mask`: rows packed, transformers' own packed `position_ids` path
         (SDPA with the `[N, N]` block-diagonal mask it builds), our chunked projection;
       * `packed, SDPA per row`: rows packed, one SDPA call per row and layer;
       * `packed, one grid`: our attention with every row in one padded grid (no length buckets);
       * `packed, length buckets`: our attention, rows bucketed by length (each prompt still
         repeated per response);
       * `packed + shared prompt (ours)`: what the learner runs: each group's prompt once.
       FlexAttention is tried too; torch has no CPU backward for it (recorded as unsupported).
       Seconds per step, median of `--repeats` after one untimed step; all layouts must give the
       padded log-probs (checked).
    3. Teacher: `shared_prompt_logprobs` (no grad) of the same responses after each group's
       privileged prompt (question + reference solution in the default teacher template), now (one
       packed forward, each prompt once) and at `BEFORE` (each prompt prefilled once, its KV cache
       repeated for the group, responses right-padded). Seconds, median of `--repeats`; same values
       (checked).

Output: tables on stdout, `benchmarks/results/packing.json` and `benchmarks/results/packing.png`.

    .venv/bin/python benchmarks/packing.py
    .venv/bin/python benchmarks/packing.py --shapes embedded --repeats 2     # quicker
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from harness import RESULTS, ROOT, TASK_SHAPES, WORK, environment, finish, save_figure, task_model_dir
from transformers import AttentionInterface, PreTrainedModel

from rlsd_contracts.config import DEFAULT_TEACHER_TEMPLATE, EmbeddedTaskSection, ModelSection
from rlsd_trainer.cli import quiet_libraries
from rlsd_trainer.data.embedded import generate_examples
from rlsd_trainer.model import attention
from rlsd_trainer.model.loading import encode_prompt, load_model
from rlsd_trainer.model.logprobs import (
    PackedBatch,
    _ChunkedTokenLogprobs,
    pack,
    response_logprobs,
    shared_prompt_logprobs,
)
from rlsd_trainer.rollout.engine import LocalEngine, SamplingParams
from rlsd_trainer.training.teacher import render_teacher_prompt

# The last commit before the padding-free learner and sampler.
BEFORE = "1ab1f17"
LAYOUTS = (
    "padded (before)",
    "packed, dense block mask",
    "packed, SDPA per row",
    "packed, one grid",
    "packed, length buckets",
    "packed + shared prompt (ours)",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(TASK_SHAPES), help="comma-separated TASK_SHAPES")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-sft-steps", type=int, default=150)
    parser.add_argument("--work-dir", type=Path, default=WORK / "packing")
    parser.add_argument("--out", type=Path, default=RESULTS / "packing.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "packing.png")
    return parser


def module_before(name: str) -> ModuleType:
    """`rlsd_trainer/<name>.py` as it was at `BEFORE`, imported under another name."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE}:trainer/src/rlsd_trainer/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as error:
        raise SystemExit(
            f"needs the git history up to {BEFORE} (a full clone): {error.stderr.strip()}"
        ) from None
    path = WORK / "before" / f"{name}_before.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"{name}_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def median_times(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each, after one untimed call each, in rotating order."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds[name].append(timed(calls[name]))
    return seconds


# ---- 1. the sampler -----------------------------------------------------------------------------


def measure_sampler(
    args: argparse.Namespace, model: PreTrainedModel, stop_ids: tuple[int, ...], prompts: list[list[int]]
) -> tuple[dict[str, Any], list[list[int]]]:
    rollout_before = module_before("rollout")
    params = SamplingParams(
        n=args.group, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=7
    )
    before = rollout_before.LocalEngine(copy.deepcopy(model), 0, stop_ids, 256)
    after = LocalEngine(copy.deepcopy(model), stop_ids, 256)
    outputs: dict[str, list[list[int]]] = {}

    def call(name: str, engine: Any) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = [c.token_ids for group in engine.generate(prompts, params) for c in group]

        return run

    seconds = median_times({"before": call("before", before), "after": call("after", after)}, args.repeats)
    differing = sum(a != b for a, b in zip(outputs["before"], outputs["after"], strict=True))
    generated = sum(map(len, outputs["after"]))
    rates = {name: generated / statistics.median(values) for name, values in seconds.items()}
    lengths = [len(tokens) for tokens in outputs["after"]]
    return {
        "seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_second": rates,
        "speedup": rates["after"] / rates["before"],
        "rows_with_other_tokens": differing,
        "response_length_mean": statistics.fmean(lengths),
        "truncated_fraction": sum(n == args.max_new_tokens for n in lengths) / len(lengths),
    }, outputs["after"]


# ---- 2. the learner's layouts -------------------------------------------------------------------


def per_row_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    bounds: list[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One causal SDPA call per packed row (`bounds`: row offsets); `[1, H, N, d]` -> `[1, N, H, d]`."""
    assert bounds is not None
    gqa = query.shape[1] != key.shape[1]
    rows = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(rows, 2).transpose(1, 2), None


AttentionInterface.register("per_row", per_row_attention)


def project(
    model: PreTrainedModel, hidden: torch.Tensor, batch: PackedBatch, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our chunked log-probs and entropies of the responses of rows `prompt + response` packed from
    `starts`."""
    row, column = torch.nonzero(batch.response_mask, as_tuple=True)
    prompt_lengths = batch.prompt_lengths[batch.groups]
    predicting = starts[row] + prompt_lengths[row] + column - 1
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        hidden[predicting],
        model.get_output_embeddings().weight,
        batch.response_ids[row, column],
        256,
        None,
        True,
    )
    return logprobs, entropy


def learner_steps(
    model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]], group: int
) -> dict[str, Callable[[], float]]:
    """One forward + backward per layout; each returns the sum of the response log-probs."""
    logprobs_before = module_before("logprobs")
    groups = [index // group for index in range(len(responses))]
    rows = [prompts[g] for g in groups]
    shared = pack(prompts, responses, groups)
    repeated = pack(rows, responses)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(rows, responses, strict=True)])
    starts = F.pad(lengths.cumsum(0), (1, 0))
    flat = torch.tensor([t for p, r in zip(rows, responses, strict=True) for t in (*p, *r)])
    positions = attention.spans(torch.zeros_like(lengths), lengths).unsqueeze(0)
    sdpa_model = copy.deepcopy(model)
    sdpa_model.set_attn_implementation("sdpa")
    loop_model = copy.deepcopy(model)
    loop_model.set_attn_implementation("per_row")

    def backward(logprobs: torch.Tensor, entropy: torch.Tensor | None, of: PreTrainedModel) -> float:
        assert entropy is not None
        (logprobs.sum() + entropy.sum()).backward()
        of.zero_grad(set_to_none=True)
        return float(logprobs.detach().sum())

    def padded() -> float:
        logprobs, entropy = logprobs_before.response_logprobs(
            model, logprobs_before.pack(rows, responses, 0), 256, True
        )
        return backward(logprobs, entropy, model)

    def dense_mask() -> float:
        hidden = sdpa_model.base_model(input_ids=flat[None], position_ids=positions, use_cache=False)
        return backward(*project(sdpa_model, hidden.last_hidden_state[0], repeated, starts), sdpa_model)

    def per_row() -> float:
        bounds = starts.tolist()
        hidden = loop_model.base_model(
            input_ids=flat[None], position_ids=positions, use_cache=False, bounds=bounds
        )
        return backward(*project(loop_model, hidden.last_hidden_state[0], repeated, starts), loop_model)

    def ours(batch: PackedBatch, ratio: float) -> Callable[[], float]:
        def run() -> float:
            saved, attention.BUCKET_RATIO = attention.BUCKET_RATIO, ratio
            try:
                logprobs, entropy = response_logprobs(model, batch, 256, with_entropy=True)
            finally:
                attention.BUCKET_RATIO = saved
            return backward(logprobs, entropy, model)

        return run

    return {
        "padded (before)": padded,
        "packed, dense block mask": dense_mask,
        "packed, SDPA per row": per_row,
        "packed, one grid": ours(repeated, float("inf")),
        "packed, length buckets": ours(repeated, attention.BUCKET_RATIO),
        "packed + shared prompt (ours)": ours(shared, attention.BUCKET_RATIO),
    }


def measure_teacher(
    args: argparse.Namespace, model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]]
) -> dict[str, Any]:
    logprobs_before = module_before("logprobs")
    model.eval()
    values: dict[str, torch.Tensor] = {}

    def call(name: str, run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                values[name] = run()

        return step

    seconds = median_times(
        {
            "before": call(
                "before",
                lambda: logprobs_before.shared_prompt_logprobs(model, prompts, responses, args.group, 0),
            ),
            "after": call("after", lambda: shared_prompt_logprobs(model, prompts, responses, args.group)),
        },
        args.repeats,
    )
    model.train()
    difference = float((values["before"] - values["after"]).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"teacher log-probs differ from the previous path's by {difference}")
    medians = {name: statistics.median(value) for name, value in seconds.items()}
    return {
        "seconds": seconds,
        "median_seconds": medians,
        "speedup": medians["before"] / medians["after"],
        "prompt_tokens_mean": statistics.fmean(map(len, prompts)),
        "max_difference": difference,
    }


def flex_attention_on_cpu() -> str:
    """Whether FlexAttention can run the learner's backward on CPU here."""
    from torch.nn.attention.flex_attention import flex_attention

    query = torch.randn(1, 2, 8, 16, requires_grad=True)
    try:
        flex_attention(query, query, query).sum().backward()
    except (NotImplementedError, RuntimeError) as error:
        return f"unsupported: {error}".splitlines()[0]
    return "supported"


def measure_learner(
    args: argparse.Namespace, model: PreTrainedModel, prompts: list[list[int]], responses: list[list[int]]
) -> dict[str, Any]:
    model.train()
    steps = learner_steps(model, prompts, responses, args.group)
    values = {name: step() for name, step in steps.items()}
    reference = values["padded (before)"]
    for name, value in values.items():
        if abs(value - reference) > 1e-4 * abs(reference):
            raise SystemExit(f"{name}: log-prob sum {value} differs from the padded path's {reference}")
    seconds = median_times(steps, args.repeats)
    rows = [p for p in prompts for _ in range(args.group)]
    real = sum(map(len, rows)) + sum(map(len, responses))
    widest = max(len(p) + len(r) for p, r in zip(rows, responses, strict=True))
    shared = sum(map(len, prompts)) + sum(map(len, responses))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "seconds": seconds,
        "median_seconds": medians,
        "speedup_over_padded": {name: medians["padded (before)"] / value for name, value in medians.items()},
        "tokens": {"padded": len(rows) * widest, "packed": real, "packed_shared_prompt": shared},
    }


# ---- report -------------------------------------------------------------------------------------


def task_prompts(model_dir: Path, count: int) -> tuple[list[list[int]], list[list[int]]]:
    """The task's prompts, and the teacher's privileged prompts of the same questions."""
    tokenizer = load_model(model_dir, ModelSection()).tokenizer
    rows = generate_examples(EmbeddedTaskSection(), "train", seed=0)[:count]
    privileged = [
        render_teacher_prompt(DEFAULT_TEACHER_TEMPLATE, row.question, row.reference) for row in rows
    ]
    return [encode_prompt(tokenizer, row.question) for row in rows], [
        encode_prompt(tokenizer, text) for text in privileged
    ]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results)
    fig, axes = plt.subplots(3, len(shapes), figsize=(7 * len(shapes), 11), squeeze=False)
    for column, shape in enumerate(shapes):
        sampler, learner = results[shape]["sampler"], results[shape]["learner"]
        top = axes[0][column]
        rates = sampler["tokens_per_second"]
        bars = top.bar(["before", "after"], [rates["before"], rates["after"]], color=["#999999", "#4c72b0"])
        top.bar_label(bars, fmt="%.0f")
        top.set_title(f"{shape}: sampler tokens/s ({sampler['speedup']:.2f}x)", fontsize=10)
        bottom = axes[1][column]
        names = list(learner["median_seconds"])
        values = [learner["median_seconds"][name] for name in names]
        colours = ["#999999"] + ["#c0c0e0"] * (len(names) - 2) + ["#4c72b0"]
        bars = bottom.barh(names, values, color=colours)
        bottom.bar_label(bars, fmt="%.2f s")
        bottom.invert_yaxis()
        bottom.set_title(f"{shape}: learner step (forward + backward)", fontsize=10)
        bottom.set_xlabel("seconds (median)")
        teacher = results[shape]["teacher"]["median_seconds"]
        last = axes[2][column]
        bars = last.bar(
            ["before", "after"], [teacher["before"], teacher["after"]], color=["#999999", "#4c72b0"]
        )
        last.bar_label(bars, fmt="%.3f s")
        last.set_title(f"{shape}: teacher scoring (seconds)", fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"environment": environment(), "before_commit": BEFORE, "threads": args.threads}
    report["flex_attention_cpu_backward"] = flex_attention_on_cpu()
    print(
        f"load average {report['environment']['load_average_start']}; FlexAttention backward on CPU: "
        f"{report['flex_attention_cpu_backward']}",
        flush=True,
    )
    results: dict[str, Any] = {}
    for shape in args.shapes.split(","):
        model_dir = task_model_dir(args.work_dir, shape, 0, args.warmup_sft_steps, 2000)
        loaded = load_model(model_dir, ModelSection())
        prompts, teacher_prompts = task_prompts(model_dir, args.prompts)
        print(f"{shape}: sampler ...", flush=True)
        sampler, responses = measure_sampler(args, loaded.model, loaded.stop_token_ids, prompts)
        print(f"{shape}: learner layouts ...", flush=True)
        learner = measure_learner(args, loaded.model, prompts, responses)
        print(f"{shape}: teacher ...", flush=True)
        teacher = measure_teacher(args, loaded.model, teacher_prompts, responses)
        results[shape] = {"sampler": sampler, "learner": learner, "teacher": teacher}
        print(
            f"\n{shape}: {args.prompts} prompts x {args.group}, up to {args.max_new_tokens} new tokens, "
            f"{args.threads} threads; responses {sampler['response_length_mean']:.1f} tokens on average, "
            f"{100 * sampler['truncated_fraction']:.0f}% cut at the limit"
        )
        rates = sampler["tokens_per_second"]
        print(
            f"  sampler: {rates['before']:.0f} -> {rates['after']:.0f} generated tokens/s "
            f"({sampler['speedup']:.2f}x); rows whose tokens differ from before: "
            f"{sampler['rows_with_other_tokens']} of {args.prompts * args.group}"
        )
        tokens = learner["tokens"]
        print(
            f"  learner tokens: padded {tokens['padded']}, packed {tokens['packed']}, "
            f"packed with shared prompts {tokens['packed_shared_prompt']}"
        )
        for name in LAYOUTS:
            print(
                f"  {name:<32}{learner['median_seconds'][name]:>8.3f} s"
                f"{learner['speedup_over_padded'][name]:>8.2f}x"
            )
        times = teacher["median_seconds"]
        print(
            f"  teacher ({teacher['prompt_tokens_mean']:.0f}-token privileged prompts): "
            f"{times['before']:.3f} s -> {times['after']:.3f} s ({teacher['speedup']:.2f}x), same values"
        )
    report.update(
        {
            "setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "shapes": results,
        }
    )
    finish(report, args.out)
    if str(args.plot) not in ("", "."):
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
