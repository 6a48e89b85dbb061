"""The `ssmkit` command line: help everywhere, one-line usage errors, clear run errors."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from ssmkit.apps.cli import load_applications, main

SSMKIT = Path(sys.executable).with_name("ssmkit")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def every_command():
    yield []
    for app in load_applications():
        yield [app.name]
        for command in app.commands():
            yield [app.name, command.name]
    yield ["demo"]


@pytest.mark.skipif(not SSMKIT.exists(), reason=f"the ssmkit console script is not installed next to {sys.executable}")
def test_console_script_help_and_bad_flag():
    proc = subprocess.run([str(SSMKIT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "seq" in proc.stdout and "demo" in proc.stdout
    proc = subprocess.run([str(SSMKIT), "seq", "train", "--no-such-flag"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "ssmkit seq train: error: unrecognized arguments: --no-such-flag (see ssmkit seq train --help)"]


@pytest.mark.parametrize("argv", list(every_command()), ids=lambda a: " ".join(a) or "ssmkit")
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ssmkit")
    if len(argv) == 2 or argv == ["demo"]:
        assert "(default: " in out and "--config FILE.toml" in out


def test_every_option_help_shows_its_default(capsys):
    for app in load_applications():
        for command in app.commands():
            with pytest.raises(SystemExit):
                main([app.name, command.name, "--help"])
            text = " ".join(capsys.readouterr().out.split())
            fields = dataclasses.fields(command.config)
            assert text.count("(default: ") == len(fields)
            for f in fields:
                assert f"--{f.name.replace('_', '-')}" in text


@pytest.mark.parametrize("argv, message", [
    (["seq", "train", "--steps", "many"], "ssmkit seq train: error: argument --steps: invalid int value: 'many'"),
    (["seq", "launch"], "ssmkit seq: error: argument COMMAND: invalid choice: 'launch'"),
    (["nope"], "ssmkit: error: argument APPLICATION: invalid choice: 'nope'"),
    (["seq"], "ssmkit seq: error: the following arguments are required: COMMAND"),
    (["seq", "train", "--device", "tpu"], "ssmkit seq train: error: argument --device: invalid choice: 'tpu'"),
])
def test_bad_command_lines_give_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_config_errors_exit_2_naming_the_file(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("stepz = 3\n")
    assert main(["seq", "train", "--config", str(toml)]) == 2
    assert capsys.readouterr().err.strip() == \
        f"ssmkit: error: {toml}: unknown key 'stepz' (did you mean 'steps'?); run with --help to see the options"


def test_run_errors_exit_1_without_traceback(tmp_path, capsys):
    argv = ["seq", "train", "--out-dir", str(tmp_path), "--train-size", "8", "--batch-size", "16"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("ssmkit: error: batch_size 16 is larger than the training set of seq (8 samples); "
                           "lower --batch-size")
    assert main(["seq", "eval", "--out-dir", str(tmp_path / "none"), "--eval-size", "4"]) == 1
    assert "holds no ssmkit run (no config.toml)" in capsys.readouterr().err
    assert main(["seq", "train", "--out-dir", str(tmp_path / "x"), "--model", "mamba_lm_tinyy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssmkit: error: --model: unknown model 'mamba_lm_tinyy'. Similar: "
                                               "mamba_lm_tiny")
    assert main(["seq", "train", "--out-dir", str(tmp_path / "x"), "--model-kwargs", "d_modl=8"]) == 2
    assert "--model mamba_lm_tiny --model-kwargs 'd_modl=8'" in capsys.readouterr().err


def test_seq_train_resume_eval_with_the_runs_own_sizes(tmp_path, capsys):
    tiny = ["--context", "8", "--n-data", "2", "--n-symbols", "3", "--train-size", "32", "--eval-size", "16",
            "--model-kwargs", "d_model=8,n_layer=1,d_state=4", "--batch-size", "8", "--eval-every", "0"]
    out = str(tmp_path / "run")
    assert main(["seq", "train", "--out-dir", out, "--steps", "3", *tiny]) == 0
    assert main(["seq", "train", "--out-dir", out, "--steps", "3", *tiny]) == 1
    assert "already holds the checkpoints of another run" in capsys.readouterr().err
    assert main(["seq", "train", "--config", f"{out}/config.toml", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["seq", "train", "--config", f"{out}/config.toml", "--lr", "0.5", "--resume"]) == 1
    assert "with --lr 0.5 (the run's: 0.01)" in capsys.readouterr().err
    # eval needs only the run folder: its model sizes and data come from the run
    assert main(["seq", "eval", "--out-dir", out]) == 0
    said = capsys.readouterr().out
    assert "seq eval of" in said and "on 16 held-out selective-copy sequences (context 8" in said
    assert (tmp_path / "run" / "eval.json").exists()
    # told otherwise: scored on other data of the same vocabulary, and it says so
    assert main(["seq", "eval", "--out-dir", out, "--context", "12", "--eval-size", "8"]) == 0
    assert "on 8 held-out selective-copy sequences (context 12" in capsys.readouterr().out
    assert main(["seq", "eval", "--out-dir", out, "--n-symbols", "5"]) == 1
    assert "vocab_size 7, the run in" in capsys.readouterr().err


def test_seq_task_trains_a_mamba2_lm(tmp_path):
    tiny = ["--context", "8", "--n-data", "2", "--n-symbols", "3", "--train-size", "32", "--eval-size", "16",
            "--model", "mamba2_lm_tiny", "--model-kwargs", "d_model=16,n_layer=1,d_state=4,headdim=8",
            "--batch-size", "8", "--eval-every", "0"]
    assert main(["seq", "train", "--out-dir", str(tmp_path / "run"), "--steps", "2", *tiny]) == 0
    assert main(["seq", "eval", "--out-dir", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("argv", [["audio", "generate"], ["dna", "embed"], ["mil", "heatmap"], ["classify", "predict"],
                                  ["video", "generate"], ["restore", "run"], ["seq", "eval"]])
def test_commands_on_a_run_list_no_training_options(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = capsys.readouterr().out
    for flag in ("--lr ", "--steps ", "--ema-decay", "--warmup-steps", "--batch-size"):
        assert flag not in text, (argv, flag)


def test_every_application_takes_a_registered_model():
    for app in load_applications():
        names = {f.name for f in dataclasses.fields(app.train_config)}
        assert {"model", "model_kwargs"} <= names, app.name
