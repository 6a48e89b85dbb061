"""Configuration by composition: option groups -> flags, TOML files, given options, key=value lists."""
import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from ssmkit.apps.config import (ConfigError, RunOptions, TrainOptions, add_arguments, build_config, compose, given,
                                option, parse_kwargs, replace, to_toml)


@dataclass
class DemoOptions:
    title = "demo-app"
    width: int = option(8, "hidden width")
    mode: str = option("fast", "how to run", ("fast", "slow"))


DemoAppConfig = compose("DemoAppConfig", RunOptions, DemoOptions, TrainOptions, defaults=dict(steps=10))


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoAppConfig)
    return build_config(DemoAppConfig, parser.parse_args(argv))


def test_flags_override_file_which_overrides_defaults(tmp_path):
    cfg = parse([])
    assert (cfg.width, cfg.steps, cfg.lr, cfg.resume) == (8, 10, 1e-3, False)
    toml = tmp_path / "run.toml"
    toml.write_text('width = 32\nlr = 1\nmode = "slow"\nbatch-size = 4\nresume = true\n')
    cfg = parse(["--config", str(toml), "--width", "64", "--no-resume"])
    assert (cfg.width, cfg.lr, cfg.mode, cfg.batch_size, cfg.resume) == (64, 1.0, "slow", 4, False)
    assert isinstance(cfg.lr, float)


def test_toml_round_trip(tmp_path):
    cfg = parse(["--width", "3", "--out-dir", 'a "quoted" \\ dir', "--ema-decay", "0.5"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert parse(["--config", str(path)]) == cfg


def test_unknown_toml_key_names_key_and_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("widht = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'widht' \(did you mean 'width'\?\)"):
        parse(["--config", str(toml)])


@pytest.mark.parametrize("text, message", [
    ('width = "3"', "width must be int"),
    ("mode = 'medium'", "mode must be one of fast, slow"),
    ("resume = 1", "resume must be bool"),
    ("width = [", "not valid TOML"),
])
def test_bad_toml_values(tmp_path, text, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        parse(["--config", str(toml)])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse(["--config", str(tmp_path / "nope.toml")])


def test_validation():
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        parse(["--batch-size", "0"])
    with pytest.raises(ConfigError, match="contradict"):
        parse(["--resume", "--overwrite"])


def test_help_lists_every_option_with_its_default(capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_arguments(parser, DemoAppConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "demo-app options: --width INT hidden width (default: 8)" in text
    assert "training options:" in text
    assert "--mode {fast,slow} how to run (default: \"fast\")" in text
    for name in ("--steps", "--batch-size", "--grad-accum", "--ema-decay", "--resume, --no-resume", "--overwrite"):
        assert name in text


def test_composition_keeps_one_declaration_per_option_and_a_table_of_defaults():
    fields = {f.name: f for f in dataclasses.fields(DemoAppConfig)}
    assert fields["steps"].default == 10 and fields["steps"].metadata["help"] == "optimizer steps to train for"
    assert dataclasses.fields(TrainOptions)[0].default == 1000  # the group itself is unchanged
    assert DemoAppConfig.__option_groups__[1] == ("demo-app", ("width", "mode"))
    with pytest.raises(TypeError, match="defaults for options it does not have: stepz"):
        compose("Bad", RunOptions, TrainOptions, defaults=dict(stepz=3))
    with pytest.raises(TypeError, match="option 'steps' is in both TrainOptions and Dup"):
        compose("Bad", TrainOptions, dataclass(type("Dup", (), {"__annotations__": {"steps": int}, "steps": 1})))
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):  # the groups' checks run
        parse(["--batch-size", "0"])


def test_given_options_are_remembered(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("width = 4\n")
    cfg = parse(["--config", str(toml), "--lr", "0.5"])
    assert given(cfg) == {"width", "lr"} and given(DemoAppConfig()) == frozenset()
    assert given(replace(cfg, steps=3)) == {"width", "lr"}


def test_parse_kwargs_reads_python_literals():
    assert parse_kwargs("a=1, b=0.5,c=true,d=name,e=(2,2),f=[1, 2],g='x,y'") == \
        {"a": 1, "b": 0.5, "c": True, "d": "name", "e": (2, 2), "f": [1, 2], "g": "x,y"}
    assert parse_kwargs("") == {}
    with pytest.raises(ConfigError, match="model_kwargs: 'num_heads' is not key=value"):
        parse_kwargs("num_heads", "model_kwargs")
