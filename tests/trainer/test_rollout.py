"""Token sampling and the in-process rollout engine on a tiny random Qwen3 model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_logprobs, tiny_model

from rlsd_trainer.model.attention import DecodeCache
from rlsd_trainer.model.logprobs import pack, response_logprobs, shared_prompt_logprobs
from rlsd_trainer.rollout.engine import Completion, LocalEngine, SamplingParams, sample_next

PAD = 0
# Prompts of different lengths, so the engine's left padding is exercised.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33]]


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_model(seed)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # LocalEngine puts the model in eval mode without grad; tests that change weights build their own.
    return _tiny_model()


# --------------------------------------------------------------------------------------------------
# sample_next
# --------------------------------------------------------------------------------------------------


def test_sample_next_greedy_at_temperature_zero() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 4.0, 4.9]])
    out = sample_next(logits, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert out.tolist() == [1, 0]


def test_sample_next_tiny_top_p_keeps_only_the_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator)
    # Even with a flat-ish distribution (high temperature), a tiny nucleus leaves only the top token.
    for _ in range(20):
        out = sample_next(logits, 5.0, 1e-6, generator)
        assert torch.equal(out, logits.argmax(-1))


def test_sample_next_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    # probs = softmax(log [0.5, 0.3, 0.15, 0.05]) = [0.5, 0.3, 0.15, 0.05]; top_p = 0.7:
    # cumulative before each token = [0, 0.5, 0.8, 0.95] -> tokens 0 and 1 survive (0.8 >= 0.7 drops 2, 3)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    out = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(1))
    counts = torch.bincount(out, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    # Renormalised 0.5 : 0.3 -> token 0 share 0.625
    assert float(counts[0]) / 4000 == pytest.approx(0.625, abs=0.03)


def test_sample_next_is_reproducible_with_a_seeded_generator() -> None:
    logits = torch.randn(8, 97, generator=torch.Generator().manual_seed(3))
    first = [sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    generator = torch.Generator().manual_seed(11)
    draws = torch.stack([sample_next(logits, 1.0, 1.0, generator) for _ in range(5)])
    assert len({tuple(row.tolist()) for row in draws}) > 1  # the generator advances


# --------------------------------------------------------------------------------------------------
# LocalEngine
# --------------------------------------------------------------------------------------------------


def _flat(completions: list[list[Completion]]) -> list[Completion]:
    return [c for group in completions for c in group]


def _engine_logprobs_match_model(model: torch.nn.Module, prompts: list[list[int]], outputs) -> None:
    rows = [prompt for prompt, group in zip(prompts, outputs, strict=True) for _ in group]
    completions = _flat(outputs)
    batch = pack(rows, [c.token_ids for c in completions])
    with torch.no_grad():
        expected, _ = response_logprobs(model, batch, chunk_tokens=16)
    for i, completion in enumerate(completions):
        got = torch.tensor(completion.logprobs)
        torch.testing.assert_close(got, expected[i, : len(completion.token_ids)], atol=1e-4, rtol=0)


def test_generate_shapes_order_and_logprobs(model: torch.nn.Module) -> None:
    engine = LocalEngine(model, stop_ids=[])
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=5, seed=0)
    outputs = engine.generate(PROMPTS, params)
    assert len(outputs) == len(PROMPTS)
    for group in outputs:
        assert len(group) == 3
        for completion in group:
            assert len(completion.token_ids) == len(completion.logprobs) == 5
            assert completion.finish_reason == "length"
            assert completion.policy_version == 0
            assert all(lp <= 0.0 for lp in completion.logprobs)
    # Prompt order: generating the prompts one at a time (greedy) reproduces each group.
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=5)
    together = engine.generate(PROMPTS, greedy)
    for prompt, group in zip(PROMPTS, together, strict=True):
        alone = engine.generate([prompt], greedy)[0]
        assert [c.token_ids for c in group] == [c.token_ids for c in alone]
    # KV-cache decoding with left padding over prompts of different lengths reports the same
    # log-probs as one full forward pass over right-padded prompt + response.
    _engine_logprobs_match_model(model, PROMPTS, outputs)
    _engine_logprobs_match_model(model, PROMPTS, together)


def test_same_seed_same_outputs(model: torch.nn.Module) -> None:
    engine = LocalEngine(model, stop_ids=[])
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=42)
    first = engine.generate(PROMPTS, params)
    second = engine.generate(PROMPTS, params)
    assert first == second
    other = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=43))
    assert [c.token_ids for c in _flat(other)] != [c.token_ids for c in _flat(first)]


def test_greedy_stops_on_stop_token(model: torch.nn.Module) -> None:
    probe = LocalEngine(model, stop_ids=[])
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
    free = [group[0] for group in probe.generate(PROMPTS, greedy)]
    stop_id = free[0].token_ids[0]  # the greedy first token of prompt 0
    engine = LocalEngine(model, stop_ids=[stop_id])
    stopped = [group[0] for group in engine.generate(PROMPTS, greedy)]
    assert stopped[0].token_ids == [stop_id]
    assert stopped[0].finish_reason == "stop"
    assert len(stopped[0].logprobs) == 1
    assert any(len(c.token_ids) > 1 for c in stopped[1:])  # some rows outlive row 0
    assert stopped[0].logprobs[0] == pytest.approx(free[0].logprobs[0], abs=1e-5)
    for unstopped, completion in zip(free[1:], stopped[1:], strict=True):
        if stop_id in unstopped.token_ids:
            cut = unstopped.token_ids.index(stop_id) + 1
            assert completion.token_ids == unstopped.token_ids[:cut]
            assert completion.finish_reason == "stop"
        else:
            # Other rows keep decoding after row 0 finished, unaffected by it.
            assert completion.token_ids == unstopped.token_ids
            assert completion.finish_reason == "length"
    _engine_logprobs_match_model(model, PROMPTS, [[c] for c in stopped])


def test_small_max_batch_size_gives_the_same_greedy_outputs(model: torch.nn.Module) -> None:
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=5)
    big = LocalEngine(model, stop_ids=[], max_batch_size=256).generate(PROMPTS, greedy)
    small = LocalEngine(model, stop_ids=[], max_batch_size=3).generate(PROMPTS, greedy)
    assert [[c.token_ids for c in g] for g in small] == [[c.token_ids for c in g] for g in big]
    for group_small, group_big in zip(small, big, strict=True):
        for a, b in zip(group_small, group_big, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_update_weights_changes_outputs_and_version() -> None:
    engine = LocalEngine(_tiny_model(seed=0), stop_ids=[])
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=5)
    before = engine.generate(PROMPTS, greedy)
    new_model = _tiny_model(seed=1)
    engine.update_weights(((name, p.detach()) for name, p in new_model.named_parameters()), version=7)
    assert engine.policy_version == 7
    after = engine.generate(PROMPTS, greedy)
    assert all(c.policy_version == 7 for c in _flat(after))
    assert all(c.policy_version == 0 for c in _flat(before))
    assert [c.logprobs for c in _flat(after)] != [c.logprobs for c in _flat(before)]
    # The engine now behaves exactly like the new model.
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, dict(new_model.named_parameters())[name]), name
    reference = LocalEngine(new_model, stop_ids=[]).generate(PROMPTS, greedy)
    assert [c.token_ids for c in _flat(after)] == [c.token_ids for c in _flat(reference)]


def test_shared_prompt_logprobs_equal_the_concatenated_rows(model: torch.nn.Module) -> None:
    """The teacher's path (each prompt run once, packed; the responses packed after it, each attending
    to its group's prompt keys) scores what the learner's path scores on `prompt + response` rows,
    and what a plain padded forward of those rows gives."""
    group = 2
    responses = [[40, 41, 42], [43], [50, 51, 52, 53, 54], [55, 56], [60], [61, 62, 63], [70, 71], [72]]
    shared = shared_prompt_logprobs(model, PROMPTS, responses, group, chunk_tokens=4)
    rows = [prompt for prompt in PROMPTS for _ in range(group)]
    with torch.no_grad():
        expected, _ = response_logprobs(model, pack(rows, responses), chunk_tokens=4)
        padded, _ = padded_logprobs(model, rows, responses)
    assert shared.shape == expected.shape
    torch.testing.assert_close(shared, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
    assert torch.all(shared[expected == 0] == 0)  # padding stays exactly 0
    with pytest.raises(ValueError, match="group"):
        shared_prompt_logprobs(model, PROMPTS, responses[:-1], group)


# --------------------------------------------------------------------------------------------------
# The sampler against the one it replaced, and finished rows leaving the batch
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _reference_generate(
    model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int], batch: int
) -> list[list[Completion]]:
    """The sampler before this engine: left-padded prompts, transformers' KV cache grown every step,
    and every row decoded until the last row of its batch stops (finished rows drew on, their tokens
    dropped)."""
    generator = torch.Generator().manual_seed(params.seed)
    rows = [prompt for prompt in prompts for _ in range(params.n)]
    completions = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        finished = torch.zeros(len(chunk), dtype=torch.bool)
        tokens, logprobs, cache = [], [], None
        for _ in range(params.max_new_tokens):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            next_ids = sample_next(logits, params.temperature, params.top_p, generator)
            next_ids = torch.where(finished, PAD, next_ids)
            tokens.append(next_ids)
            logprobs.append(logits.log_softmax(-1).gather(-1, next_ids[:, None])[:, 0])
            finished |= torch.isin(next_ids, torch.tensor(stop_ids))
            if bool(finished.all()):
                break
            ids, positions = next_ids[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=-1)
        for row_tokens, row_logprobs in zip(
            torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist(), strict=True
        ):
            stops = [i for i, token in enumerate(row_tokens) if token in stop_ids]
            length = stops[0] + 1 if stops else len(row_tokens)
            reason = "stop" if stops else "length"
            completions.append(Completion(row_tokens[:length], row_logprobs[:length], reason, 0))
    return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the reference's `past_key_values` argument
@pytest.mark.parametrize(
    ("temperature", "top_p", "batch"), [(1.0, 1.0, 256), (0.7, 0.8, 256), (1.0, 0.95, 5)]
)
def test_same_seed_gives_the_reference_samplers_tokens_for_every_row(
    temperature: float, top_p: float, batch: int
) -> None:
    """Rows that stop early leave the batch, yet each row gets the tokens (and, to float rounding,
    the log-probs) the previous sampler gave it for the same seed."""
    model = _tiny_model(seed=3)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 97, (n,), generator=generator).tolist() for n in (1, 4, 9, 2, 6, 11, 3)]
    stop_ids = [5, 9, 17, 33]  # frequent enough that rows stop at many different steps
    engine = LocalEngine(model, stop_ids=stop_ids, max_batch_size=batch)
    for seed in range(2):
        params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_new_tokens=12, seed=seed)
        expected = _flat(_reference_generate(model, prompts, params, stop_ids, batch))
        got = _flat(engine.generate(prompts, params))
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]
        for mine, theirs in zip(got, expected, strict=True):
            assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-5)
        lengths = {len(c.token_ids) for c in got}
        assert len(lengths) > 3 and 12 in lengths  # rows stopped at many steps, some ran to the end


def test_finished_rows_leave_the_batch_and_the_cache_is_allocated_once(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[tuple[int, int, list[int]]] = []
    step = DecodeCache.step

    def spy(cache: DecodeCache, model: torch.nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        steps.append((len(token_ids), len(cache.lengths), [buffer.data_ptr() for buffer in cache.keys]))
        return step(cache, model, token_ids)

    monkeypatch.setattr(DecodeCache, "step", spy)
    stop_ids = [5, 9, 17, 33]
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=1)
    completions = _flat(LocalEngine(model, stop_ids=stop_ids).generate(PROMPTS, params))
    lengths = [len(c.token_ids) for c in completions]
    assert min(lengths) < max(lengths)
    # Decode step s (the prefill gives token 0) runs exactly the rows that have a token s to draw.
    assert [rows for rows, _, _ in steps] == [sum(n > s for n in lengths) for s in range(1, max(lengths))]
    assert all(rows == cache_rows for rows, cache_rows, _ in steps)
    assert len({tuple(pointers) for _, _, pointers in steps}) == 1  # the same buffers every step
