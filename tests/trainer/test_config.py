"""Loading, validating and overriding the run configuration, and `rlsd-trainer validate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
import yaml

from rlsd_contracts.config import (
    DEFAULT_TEACHER_TEMPLATE,
    ConfigError,
    RunConfig,
    apply_override,
    load_config,
    parse_config,
)
from rlsd_contracts.exit_codes import EXIT_BAD_CONFIG
from rlsd_trainer.cli import main

PACKAGED = (
    Path(__file__).resolve().parents[2] / "trainer" / "src" / "rlsd_trainer" / "configs" / "embedded.yaml"
)


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "cfg.yaml")  # type: ignore[arg-type]
    return str(info.value)


def test_defaults_are_the_papers() -> None:
    config = parse_config({})
    algorithm = config.algorithm
    assert algorithm.name == "rlsd"
    assert algorithm.group_size == 8
    assert algorithm.eps_w == 0.2
    assert (algorithm.lam.kind, algorithm.lam.initial, algorithm.lam.final) == ("linear", 0.5, 0.0)
    assert (algorithm.lam.decay_steps, algorithm.lam.warmup_steps) == (60, 0)
    assert (algorithm.clip_low, algorithm.clip_high, algorithm.dual_clip) == (0.2, 0.28, 3.0)
    assert (algorithm.kl_coef, algorithm.entropy_coef, algorithm.ppo_epochs) == (0.0, 0.0, 1)
    assert (config.optim.lr, config.optim.weight_decay, config.optim.grad_clip) == (1e-6, 0.01, 1.0)
    assert config.rollout.sampling.temperature == 1.0
    assert config.rollout.sampling.max_new_tokens == 4096
    assert config.rollout.prompts_per_step == 256
    assert (config.teacher.mode, config.teacher.sync_interval) == ("frozen", 20)
    assert config.teacher.template == DEFAULT_TEACHER_TEMPLATE


def test_default_teacher_template_has_the_papers_shape() -> None:
    # question, then the reference introduced as such, then "solve it in your own way"
    text = DEFAULT_TEACHER_TEMPLATE.format(question="Q?", reference="R.")
    assert text.index("Q?") < text.index("reference solution") < text.index("R.")
    assert "own way" in text[text.index("R.") :]


def test_unknown_field_names_dotted_path_and_allowed_fields() -> None:
    message = _error({"algorithm": {"gruop_size": 8}})
    assert "cfg.yaml" in message
    assert "algorithm.gruop_size" in message
    assert "unknown field" in message
    for allowed in ("group_size", "eps_w", "lam", "clip_high", "dual_clip"):
        assert allowed in message


def test_unknown_nested_and_top_level_fields() -> None:
    message = _error({"algorithm": {"lam": {"intial": 0.3}}})
    assert "algorithm.lam.intial" in message
    assert "decay_steps" in message and "warmup_steps" in message
    message = _error({"algorithem": {}})
    assert "algorithem" in message and "algorithm" in message.split("allowed fields here:")[1]


def test_invalid_enum_lists_allowed_values() -> None:
    message = _error({"algorithm": {"name": "ppo"}})
    assert "algorithm.name" in message
    for value in ("'rlsd'", "'grpo'", "'opsd'", "'grpo+opsd'"):
        assert value in message


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"algorithm": {"eps_w": 1.5}}, "algorithm.eps_w"),
        ({"algorithm": {"group_size": 1}}, "algorithm.group_size"),
        ({"algorithm": {"lam": {"initial": 2}}}, "algorithm.lam.initial"),
        ({"algorithm": {"dual_clip": 0.5}}, "algorithm.dual_clip"),
        ({"rollout": {"sampling": {"top_p": 0}}}, "rollout.sampling.top_p"),
        ({"rollout": {"sampling": {"temperature": 2.5}}}, "rollout.sampling.temperature"),  # vLLM's max
        ({"rollout": {"max_staleness": 9}}, "rollout.max_staleness"),
        ({"rollout": {"max_staleness": -1}}, "rollout.max_staleness"),
        ({"rollout": {"dynamic_sampling": {"max_rounds": 0}}}, "rollout.dynamic_sampling.max_rounds"),
        ({"algorithm": {"importance_cap": 0.5}}, "algorithm.importance_cap"),
    ],
)
def test_out_of_range_names_the_field(raw: dict, field: str) -> None:
    assert f"  {field}:" in _error(raw)


def test_every_problem_is_listed() -> None:
    message = _error({"algorithm": {"eps_w": 1.5, "group_size": 1, "lam": {"initial": 2}}})
    for field in ("algorithm.eps_w", "algorithm.group_size", "algorithm.lam.initial"):
        assert field in message


def test_dual_clip_may_be_disabled() -> None:
    assert parse_config({"algorithm": {"dual_clip": None}}).algorithm.dual_clip is None


def test_teacher_template_needs_reference_placeholder() -> None:
    message = _error({"teacher": {"template": "{question} solve it"}})
    assert "teacher" in message and "{reference}" in message
    good = parse_config({"teacher": {"template": "Ref: {reference}\nQ: {question}"}})
    assert good.teacher.template.startswith("Ref:")


def test_remote_teacher_servers_cannot_receive_nccl() -> None:
    """The teacher servers are ours (gloo or filesystem); nccl is vLLM's."""
    servers = {"urls": ["http://t:8000"]}
    message = _error({"teacher": {"placement": "remote", "servers": servers}})  # nccl is the default
    assert "teacher" in message and "nccl is vLLM's" in message
    gloo = {**servers, "weight_transfer": {"backend": "gloo"}}
    assert parse_config({"teacher": {"placement": "remote", "servers": gloo}}).teacher.placement == "remote"


def test_callable_verifier_needs_callable() -> None:
    message = _error({"reward": {"verifier": "callable"}})
    assert "reward" in message and "callable" in message
    assert "package.module:function" in _error({"reward": {"verifier": "callable", "callable": "nocolon"}})
    ok = parse_config({"reward": {"verifier": "callable", "callable": "pkg.mod:fn"}})
    assert ok.reward.callable == "pkg.mod:fn"


def test_embedded_model_and_data_go_together() -> None:
    message = _error({"data": {"train": {"kind": "jsonl", "path": "train.jsonl"}}})
    assert "model.path" in message and "embedded" in message
    message = _error({"model": {"path": "Qwen/Qwen3-0.6B"}})
    assert "model.path" in message
    both = parse_config(
        {"model": {"path": "Qwen/Qwen3-0.6B"}, "data": {"train": {"kind": "jsonl", "path": "t.jsonl"}}}
    )
    assert both.model.path == "Qwen/Qwen3-0.6B"


def test_non_mapping_top_level(tmp_path: Path) -> None:
    assert "top level must be a mapping" in _error([1, 2])
    path = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "algorithm:\n  name: [rlsd\n", name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not valid YAML" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value) and "no such config file" in str(info.value)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")) == RunConfig()


def test_load_config_validates_with_file_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "algorithm:\n  gruop_size: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "algorithm.gruop_size" in str(info.value)


def test_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "algorithm:\n  name: rlsd\n  group_size: 4\n")
    config = load_config(
        path,
        [
            "algorithm.name=grpo",
            "algorithm.group_size=16",
            "algorithm.eps_w=0.3",
            "algorithm.lam.kind=constant",
            "optim.lr=1e-5",  # YAML 1.1 reads 1e-5 as a string; validation turns it into a float
            "metrics.progress_bar=false",
            "run.name=a=b",  # only the first '=' separates key and value
        ],
    )
    assert config.algorithm.name == "grpo"
    assert config.algorithm.group_size == 16
    assert config.algorithm.eps_w == 0.3
    assert config.algorithm.lam.kind == "constant"
    assert config.optim.lr == pytest.approx(1e-5)
    assert config.metrics.progress_bar is False
    assert config.run.name == "a=b"


def test_apply_override_parses_values_as_yaml() -> None:
    raw: dict = {"algorithm": {"name": "rlsd"}}
    apply_override(raw, "algorithm.group_size=3")
    apply_override(raw, "algorithm.eps_w=0.5")
    apply_override(raw, "algorithm.dual_clip=null")
    apply_override(raw, "teacher.mode=live")
    assert raw == {
        "algorithm": {"name": "rlsd", "group_size": 3, "eps_w": 0.5, "dual_clip": None},
        "teacher": {"mode": "live"},
    }
    assert isinstance(raw["algorithm"]["group_size"], int)


@pytest.mark.parametrize("bad", ["algorithm.name", "=grpo", ""])
def test_bad_override_without_equals(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"expected section\.field=value"):
        apply_override({}, bad)


def test_override_through_a_scalar_is_rejected() -> None:
    raw = {"algorithm": {"name": "rlsd"}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_override(raw, "algorithm.name.x=1")


def test_override_of_unknown_field_fails_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.gruop_size"):
        load_config(_write(tmp_path, ""), ["algorithm.gruop_size=4"])


def test_packaged_default_config_loads() -> None:
    assert PACKAGED.is_file()
    config = load_config(PACKAGED)
    assert config.model.path == "embedded"
    assert config.data.train.kind == "embedded"
    assert config.algorithm.name == "rlsd"
    assert config.algorithm.group_size == 8
    assert config.algorithm.eps_w == 0.2
    assert config.teacher.sync_interval == 20


def test_the_long_chains_variant_changes_only_its_task_warm_up_and_lengths() -> None:
    # The learning study compares algorithms on both packaged tasks: every other setting is shared.
    default = load_config(PACKAGED).model_dump()
    variant = load_config(PACKAGED.with_name("embedded-chains.yaml")).model_dump()
    assert variant["data"]["embedded"]["max_terms"] > default["data"]["embedded"]["max_terms"]
    assert variant["warmup"]["direct_answer_fraction"] == 0.0
    for config in (default, variant):
        del config["run"]["name"], config["run"]["output_dir"], config["data"]["embedded"]
        del config["warmup"]["direct_answer_fraction"]
        del config["rollout"]["sampling"]["max_new_tokens"], config["eval"]["max_new_tokens"]
    assert variant == default


def test_cli_validate_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path, "algorithm:\n  name: ppo\n", name="bad.yaml")
    assert main(["validate", "--config", str(bad)]) == EXIT_BAD_CONFIG == 3
    captured = capsys.readouterr()
    assert "error:" in captured.err
    assert "algorithm.name" in captured.err and "'grpo'" in captured.err
    assert "algorithm.name" not in captured.out


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--config", str(tmp_path / "none.yaml")]) == 3
    assert "no such config file" in capsys.readouterr().err


def test_cli_validate_good_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--config", str(PACKAGED), "--set", "algorithm.name=grpo"]) == 0
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["algorithm"]["name"] == "grpo"
    assert dumped["algorithm"]["clip_high"] == 0.28  # defaults are filled in
    assert dumped["rollout"]["prompts_per_step"] == 16
    # The CLI quiets transformers' logging so the progress bar stays readable.
    assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR


def test_override_value_that_is_not_yaml_is_kept_as_a_string() -> None:
    raw: dict = {}
    apply_override(raw, "teacher.template={question} then {reference}")
    assert raw == {"teacher": {"template": "{question} then {reference}"}}


def test_override_on_non_mapping_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"), ["algorithm.name=grpo"])


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path)
