"""Typed config: YAML + dotted overrides; unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from offpolicy.config import Config, ConfigError, dump_config, load_config, parse_override


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.rl.loss == "ppo_clip" and cfg.rl.buffer.sampling == "uniform"


def test_recipe_and_overrides(tmp_path):
    path = write(tmp_path, "rl:\n  steps: 3\n  optim:\n    lr: 1.0e-3\nsft:\n  steps: 2\n")
    cfg = load_config(path, ["rl.optim.lr=3e-4", "rl.loss_params.clip_high=0.28", "task.params.max_digits=2",
                             "rl.buffer.max_uses=null", "run.name=hello world"])
    assert cfg.rl.steps == 3 and cfg.sft.steps == 2
    assert cfg.rl.optim.lr == pytest.approx(3e-4) and isinstance(cfg.rl.optim.lr, float)
    assert cfg.rl.loss_params == {"clip_high": 0.28}
    assert cfg.task.params == {"max_digits": 2}
    assert cfg.rl.buffer.max_uses is None
    assert cfg.run.name == "hello world"


def test_exponent_floats_reach_untyped_params_as_floats(tmp_path):
    # YAML 1.1 reads 3e-4 (no dot) as a string; typed fields coerced it, free dicts (loss params) did not
    cfg = load_config(None, ["rl.loss_params.clip_high=3e-4", "task.params.eval_fraction=1e-1"])
    assert cfg.rl.loss_params["clip_high"] == pytest.approx(3e-4)
    assert cfg.task.params["eval_fraction"] == pytest.approx(0.1)
    cfg = load_config(write(tmp_path, "rl:\n  loss_params:\n    clip_high: 2.8e-1\n    clip_low: 2e-1\n"))
    assert cfg.rl.loss_params == {"clip_high": pytest.approx(0.28), "clip_low": pytest.approx(0.2)}


@pytest.mark.parametrize("text,expected", [
    ("rl.optim.lr=3e-4", (["rl", "optim", "lr"], 3e-4)),  # YAML 1.1 alone would read "3e-4" as a string
    ("rl.optim.lr=-1E+2", (["rl", "optim", "lr"], -100.0)),
    ("rl.optim.lr=1.5e-3", (["rl", "optim", "lr"], 1.5e-3)),
    ("run.name=3e", (["run", "name"], "3e")),
    ("rl.steps=10", (["rl", "steps"], 10)),
    ("run.progress=false", (["run", "progress"], False)),
    ("policy.init=runs/a/checkpoints/final", (["policy", "init"], "runs/a/checkpoints/final")),
    ("rl.optim.betas=[0.9, 0.95]", (["rl", "optim", "betas"], [0.9, 0.95])),
    ("run.name=a=b", (["run", "name"], "a=b")),
    ("run.name=", (["run", "name"], "")),
])
def test_parse_override(text, expected):
    path, value = parse_override(text)
    assert (path, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", ["rl.steps", "=3", "rl..steps=3", "rl.steps.=3"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_override_value_that_is_not_yaml():
    with pytest.raises(ConfigError, match="rl.loss: value"):
        parse_override("rl.loss=[unclosed")


def test_unknown_key_names_the_dotted_key(tmp_path):
    path = write(tmp_path, "rl:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"rl\.optim\.lrr: unknown key") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_override_key_names_it():
    with pytest.raises(ConfigError, match=r"sampling\.top_k: unknown key"):
        load_config(None, ["sampling.top_k=5"])
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        load_config(None, ["trainer.steps=5"])


@pytest.mark.parametrize("override,key", [
    ("rl.steps=abc", "rl.steps"),
    ("rl.optim.lr=fast", "rl.optim.lr"),
    ("run.progress=maybe", "run.progress"),
    ("policy.dtype=int8", "policy.dtype"),
    ("rl.old_logp=engine", "rl.old_logp"),
])
def test_wrong_type_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{key}:" in str(err.value)
    assert override.split("=")[1] in str(err.value)  # and shows what was given


def test_overriding_inside_a_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="rl.steps is not a section"):
        load_config(write(tmp_path, "rl:\n  steps: 3\n"), ["rl.steps.x=1"])
    with pytest.raises(ConfigError, match="rl.steps: Input should be a valid integer"):
        load_config(None, ["rl.steps.x=1"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,match", [("rl: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping")])
def test_malformed_recipe(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_empty_recipe_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="group_size"):
        load_config(None, ["rl.steps=1", "rl.group_size=1"])
    load_config(None, ["rl.steps=0", "rl.group_size=1"])  # the RL stage is off: nothing to check


def test_assignment_is_validated_too():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.rl.steps = "many"  # type: ignore[assignment]


def test_dump_and_reload_is_identical(tmp_path):
    cfg = load_config(None, ["rl.steps=5", "rl.loss_params.clip_high=0.28", "rl.optim.betas=[0.9, 0.95]"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rl"]["steps"] == 5
    assert load_config(tmp_path / "config.yaml") == cfg


def test_one_problem_is_one_line_and_several_are_listed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rl.stepz=1"])
    assert str(err.value) == "invalid config: rl.stepz: unknown key"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rl.stepz=1", "sft.steps=x"])
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 3
    assert any(line.strip().startswith("rl.stepz: unknown key") for line in lines)
    assert any(line.strip().startswith("sft.steps:") for line in lines)


def test_sft_stop_at_accuracy_is_checked():
    with pytest.raises(ConfigError, match="sft.stop_at_accuracy needs sft.eval_every"):
        load_config(None, ["sft.stop_at_accuracy=0.3"])
    with pytest.raises(ConfigError, match=r"sft.stop_at_accuracy=1.5 must be in \(0, 1\]"):
        load_config(None, ["sft.stop_at_accuracy=1.5", "sft.eval_every=5"])
    assert load_config(None, ["sft.stop_at_accuracy=0.3", "sft.eval_every=5"]).sft.stop_at_accuracy == 0.3


def test_sft_keep_best_needs_evaluations():
    with pytest.raises(ConfigError, match="sft.keep_best needs sft.steps > 0 and sft.eval_every > 0"):
        load_config(None, ["sft.keep_best=true", "sft.steps=10"])
    with pytest.raises(ConfigError, match="sft.keep_best needs"):
        load_config(None, ["sft.keep_best=true", "sft.eval_every=5"])
    assert load_config(None, ["sft.keep_best=true", "sft.steps=10", "sft.eval_every=5"]).sft.keep_best
