"""Configuration dataclasses -> flags and TOML files."""
import argparse
from dataclasses import dataclass

import pytest

from ssmkit.apps.config import ConfigError, TrainConfig, add_arguments, build_config, option, to_toml


@dataclass
class DemoAppConfig(TrainConfig):
    width: int = option(8, "hidden width")
    mode: str = option("fast", "how to run", ("fast", "slow"))
    steps: int = option(10, "optimizer steps")


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
    add_arguments(parser, DemoAppConfig, "demo-app options")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "demo-app options: --width INT hidden width (default: 8)" in text
    assert "training options:" in text
    assert "--mode {fast,slow} how to run (default: \"fast\")" in text
    for name in ("--steps", "--batch-size", "--grad-accum", "--ema-decay", "--resume, --no-resume", "--overwrite"):
        assert name in text
