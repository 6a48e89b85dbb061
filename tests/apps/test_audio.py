"""`ssmkit audio`: training through the shared runner (NLL below the baselines), eval, generate, score, demo."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import ssmkit.apps.cli as cli
from ssmkit.apps.application import eval_config
from ssmkit.apps.audio import AudioGenerate, AudioTrain, application, sample_clips
from ssmkit.apps.runner import Runner, evaluate_run
from ssmkit.audio.data import load_digits, mu_law_decode, split_by_speaker

TINY = dict(steps=40, batch_size=4, window=256, model_kwargs="d_model=8,n_layers=1,d_state=4", warmup_steps=2,
            lr=1e-2, log_every=10, eval_every=0, eval_batch_size=16, eval_windows=24)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "APPLICATIONS", ("ssmkit.apps.audio",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = AudioTrain(out_dir=str(tmp_path_factory.mktemp("audio")), **TINY)
    cfg.validate()
    run = Runner(application, cfg).train()
    return cfg, run, run.model


def test_short_training_beats_the_uniform_baseline_clearly(trained):
    cfg, run, _ = trained
    assert set(run.metrics) == {"nll_bits", "unigram_bits", "uniform_bits"}
    assert run.metrics["uniform_bits"] == 8.0 and 3 < run.metrics["unigram_bits"] < 6
    assert run.metrics["nll_bits"] < 6.0  # 40 tiny steps; the demo's longer run gets below the unigram too


def test_split_is_speaker_disjoint_on_the_digits(trained):
    cfg, _, _ = trained
    spec = application.setup(cfg)
    train, held = spec.train, spec.eval
    names, _ = load_digits()
    a, b = split_by_speaker(names, cfg.eval_fraction, cfg.seed)
    assert not {names[i].split("_")[0] for i in a} & {names[i].split("_")[0] for i in b}
    assert len(held) == cfg.eval_windows and len(train) == len(a) * (16000 // cfg.window)


def test_eval_matches_the_training_run(trained):
    cfg, run, _ = trained
    result = evaluate_run(application, eval_config(application)(out_dir=cfg.out_dir))
    assert result.metrics["nll_bits"] == pytest.approx(run.metrics["nll_bits"], rel=1e-5)


def test_eval_on_a_run_trained_on_a_wav_folder_scores_that_folder(tmp_path, capsys):
    """Not the embedded digits: the run's own data (and what it scored is said and recorded)."""
    data = tmp_path / "wavs"
    rng = np.random.default_rng(1)
    for speaker in ("s1", "s2", "s3", "s4"):
        _write(data, f"{speaker}_x.wav", rng.uniform(-0.5, 0.5, 2048))
    out = str(tmp_path / "run")
    assert cli.main(["audio", "train", "--data-dir", str(data), "--out-dir", out, "--steps", "2", "--batch-size", "2",
                     "--window", "256", "--model-kwargs", "d_model=8,n_layers=1,d_state=4", "--warmup-steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["audio", "eval", "--out-dir", out]) == 0
    assert f"held-out files of {data}" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["data"].endswith(f"held-out files of {data}")


def _write(folder, name, samples, rate=16000):
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(str(folder / name), samples, rate, subtype="PCM_16")


def test_cli_generate_and_score(trained, tmp_path, capsys):
    cfg, run, _ = trained
    flags = ["--out-dir", str(run.out_dir)]
    prime_wav = tmp_path / "prime.wav"
    _write(tmp_path, "prime.wav", mu_law_decode(torch.randint(100, 156, (400,))).numpy())
    out = tmp_path / "gen"
    assert cli.main(["audio", "generate", *flags, "--n-samples", "3", "--length", "48", "--gen-batch", "2",
                     "--prime", str(prime_wav), "--prime-samples", "16", "--top-p", "0.9",
                     "--output", str(out)]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert len(record["wavs"]) == 3 and record["samples_per_s"] > 0 and len(record["bits_per_sample"]) == 3
    wave, rate = sf.read(record["wavs"][0])
    assert rate == 16000 and wave.shape == (48,)
    primed, _ = sf.read(str(prime_wav))
    np.testing.assert_allclose(wave[:16], primed[:16], atol=2e-3)  # primed samples reproduced (mu-law exact codes)
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = tmp_path / "wavs"
    _write(data, "a.wav", np.sin(np.arange(600) / 7.0) * 0.3)
    _write(data, "b.wav", np.stack([np.zeros(300), np.ones(300) * 0.1], 1))  # stereo: downmixed
    assert cli.main(["audio", "score", *flags, "--score-dir", str(data)]) == 0
    scores = json.loads((run.out_dir / "score.json").read_text())
    assert set(scores["files"]) == {"a.wav", "b.wav"} and 0 < scores["nll_bits"] < 16
    assert "audio score: 2 files" in capsys.readouterr().out

    (data / "c.flac").write_bytes(b"fLaC")
    assert cli.main(["audio", "score", *flags, "--score-dir", str(data)]) == 1
    assert "c.flac" in capsys.readouterr().err
    assert cli.main(["audio", "score", *flags, "--score-dir", str(data), "--skip-bad"]) == 0
    assert cli.main(["audio", "generate", *flags, "--prime", str(prime_wav)]) == 2  # needs --prime-samples
    assert cli.main(["audio", "train", *flags, "--window", "100"]) == 2  # not a multiple of 16


def test_a_folder_without_speaker_names_points_at_the_options_and_stereo_warns_once(tmp_path, capsys):
    data = tmp_path / "wavs"
    for name in ("one.wav", "two.wav", "three.wav"):
        _write(data, name, np.stack([np.zeros(700), np.ones(700) * 0.1], 1), rate=44100)
    argv = ["audio", "train", "--data-dir", str(data), "--out-dir", str(tmp_path / "r"), "--steps", "1"]
    with pytest.warns(UserWarning) as caught:
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--speaker-pattern" in err[0] and "--eval-list" in err[0], err
    conversions = [str(w.message) for w in caught if "averaged to mono" in str(w.message)]
    assert conversions == [f"{data}: of 3 files, 3 averaged to mono and 3 resampled to 16000 Hz"]


def test_train_on_a_wav_folder_with_an_eval_list(tmp_path):
    data = tmp_path / "wavs"
    rng = np.random.default_rng(0)
    for speaker in ("s1", "s2", "s3"):
        for i in range(2):
            _write(data, f"{speaker}_nohash_{i}.wav", rng.uniform(-0.2, 0.2, 700), rate=8000)  # resampled
    (data / "eval.txt").write_text("s3_nohash_0.wav\ns3_nohash_1.wav\n")
    cfg = AudioTrain(out_dir=str(tmp_path / "run"), data_dir=str(data), eval_list=str(data / "eval.txt"),
                     **{**TINY, "steps": 2, "window": 512})
    spec = application.setup(cfg)
    train, held = spec.train, spec.eval
    assert len(train) == 4 * 2 and len(held) == 2 * 2  # 1400 samples at 16 kHz: two windows of 512 each
    assert Runner(application, cfg).train().step == 2


def test_generate_with_a_given_model(trained, tmp_path):
    cfg, _, model = trained
    record = sample_clips(AudioGenerate(n_samples=1, length=32), model, cfg, tmp_path / "generate")
    assert (tmp_path / "generate" / "sample_00.wav").is_file() and record["length"] == 32


def test_demo_smoke_section_renders(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--out-dir", str(tmp_path)]) == 0
    assert "audio: nll" in capsys.readouterr().out
    page = (tmp_path / "index.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "Waveform generation with SaShiMi" in page and "unigram baseline (bits/sample)" in md
    assert "<audio controls" in page and "audio/generate/sample_00.wav" in page
    assert "audio/generate/samples.png" in page and (tmp_path / "audio/generate/samples.png").is_file()
