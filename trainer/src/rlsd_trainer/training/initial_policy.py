"""The policy RL starts from: the embedded tiny model or a configured one, after the optional
supervised warm-up (run once, saved, reused on resume); and frozen copies of it (the KL reference,
the frozen teacher's snapshot)."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from rlsd_contracts.config import RunConfig
from rlsd_trainer.data.example import Example
from rlsd_trainer.model.loading import load_model
from rlsd_trainer.model.logprobs import PolicyScorer
from rlsd_trainer.training.distributed import DistContext, prepare_policy
from rlsd_trainer.training.warmup import supervised_warmup


def resolve_model_path(config: RunConfig) -> Path | str:
    """The starting model: the embedded tiny model (built on first use) or the configured path."""
    if config.model.path != "embedded":
        return config.model.path
    from rlsd_trainer.model.embedded import build_model_dir

    directory = config.output_dir / "embedded-model"
    if not (directory / "config.json").exists():
        build_model_dir(directory, config.data.embedded, config.run.seed)
    return directory


def prepare_initial_policy(config: RunConfig, train_set: list[Example]) -> Path | str:
    """The policy RL starts from (rank 0 builds it); with a warm-up, its result is saved once under
    `output_dir/initial-policy` and reused on resume."""
    base = resolve_model_path(config)
    if config.warmup.steps == 0:
        return base
    target = config.output_dir / "initial-policy"
    if (target / "config.json").exists():
        return target
    loaded = load_model(base, config.model)
    progress = tqdm(total=config.warmup.steps, desc="warm-up (SFT)", disable=not config.metrics.progress_bar)

    def on_step(step: int, loss: float) -> None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}")

    with progress:
        supervised_warmup(
            loaded.model,
            loaded.tokenizer,
            train_set,
            config.warmup,
            config.teacher.template,
            config.run.seed,
            config.learner.logprob_chunk_tokens,
            on_step,
        )
    staging = target.with_name(target.name + ".tmp")
    loaded.model.save_pretrained(staging, safe_serialization=True)
    loaded.tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def frozen_copy(path: Path | str, config: RunConfig, ctx: DistContext) -> PolicyScorer:
    """The initial policy again, sharded like the learner's, without gradients."""
    model = load_model(path, config.model).model.eval().requires_grad_(False)
    return prepare_policy(model, ctx, config.learner, trainable=False)
