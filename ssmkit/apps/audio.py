"""`ssmkit audio`: autoregressive waveform models (SaShiMi) on 8-bit audio: train, eval, generate, score.

Data: a folder of WAV files (--data-dir; read with soundfile, resampled to --sample-rate, quantised to
256 mu-law or linear codes), or by default the embedded spoken digits (espeak-ng, 16 kHz, one second
each; `ssmkit.audio.make_digits`). The split is speaker-disjoint (the speaker is read from the file
name) or given by --eval-list. Training minimises the next-sample cross-entropy; evaluation reports
the NLL in bits per sample next to two baselines: the uniform 8 bits and the unigram entropy of the
training codes (a model that learned nothing about time cannot beat it).

`generate` samples clips from a trained run with the O(1)-per-sample recurrence (temperature, top-p,
seed, priming from the start of a WAV file; --compile to torch.compile the step first) and writes WAV
files, a waveform + mel-spectrogram PNG and the samples/s; `score` reports the NLL of every WAV file of
a folder. Both also take an official state-spaces/s4 checkpoint (--official sashimi_sc09.pt).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, build_registered, load_run
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, WeightsOptions, compose, option)
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.run_folder import RunFolder
from ssmkit.apps.runner import Runner, train_and_eval
from ssmkit.audio.data import (IGNORE, ClipWindows, decode, encode, load_digits, load_wav_folder, read_wav,
                               split_by_list, split_by_speaker, write_wav)
from ssmkit.audio.generate import generate as sample_model
from ssmkit.audio.metrics import BITS_PER_NAT, sequence_bits, unigram_log2
from ssmkit.audio.plots import save_waveform_figure
from ssmkit.registry import load_official

__all__ = ["AudioData", "AudioTrain", "AudioGenerate", "AudioScore", "AudioApp", "application", "generate", "score"]


@dataclass
class AudioData:
    """The WAV data: where, at which rate and code, in which windows, split how."""

    title = "data"
    data_dir: str = option("", "folder of WAV files (empty: the embedded espeak-ng spoken digits)")
    sample_rate: int = option(16000, "sample rate the audio is resampled to")
    codec: str = option("mu-law", "8-bit quantisation of the samples", ("mu-law", "linear"))
    window: int = option(4096, "samples per training window (a multiple of 16; SC09 uses 16000)")
    short: str = option("pad", "clips shorter than the window: pad them, skip them or stop with an error",
                        ("pad", "skip", "error"))
    eval_list: str = option("", "text file naming the eval files (relative paths); empty: a speaker split")
    eval_fraction: float = option(0.25, "fraction of the speakers held out for evaluation")
    speaker_pattern: str = option(r"^([^_]+)_", "regex whose group 1 is the speaker in a file name")
    eval_windows: int = option(0, "evaluate on at most this many eval windows, evenly spaced (0: all)")

    def check(self) -> None:
        if self.eval_windows < 0:
            raise ConfigError(f"eval_windows must not be negative, got {self.eval_windows}")
        if self.sample_rate < 1:
            raise ConfigError(f"sample_rate must be at least 1, got {self.sample_rate}")
        if self.window < 16 or self.window % 16:
            raise ConfigError(f"window must be a positive multiple of 16 (two x4 poolings), got {self.window}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")


@dataclass
class WavReading:
    """What to do with files of a WAV folder that cannot be read."""

    title = "reading"
    skip_bad: bool = option(False, "skip non-WAV and unreadable files with a warning instead of stopping")


@dataclass
class OfficialWeights:
    """An official state-spaces/s4 checkpoint to run instead of a trained run."""

    title = "official weights"
    official: str = option("", "official SaShiMi checkpoint (a .pt state dict such as sashimi_sc09.pt, or a .ckpt) "
                               "to use instead of the run in --out-dir; its sizes come from the file, and the SC09 "
                               "model expects 16 kHz 8-bit mu-law")
    official_dt: str = option("softplus", "dt transform of the --official file: softplus (V4 training configs) or "
                                          "exp (V3 checkpoints converted with convert_v3_to_v4.py)", ("softplus", "exp"))


@dataclass
class GenerateOptions:
    """What to sample."""

    title = "generate"
    n_samples: int = option(4, "clips to generate")
    length: int = option(16000, "samples per clip (including the primed ones)")
    temperature: float = option(1.0, "softmax temperature (0: greedy)")
    top_p: float = option(1.0, "nucleus sampling: keep the most likely codes up to this probability mass")
    prime: str = option("", "WAV file whose first --prime-samples samples start every clip")
    prime_samples: int = option(0, "samples taken from --prime")
    gen_batch: int = option(16, "clips generated together")
    compile: bool = option(False, "torch.compile the recurrent step first (costs tens of seconds per batch size; "
                                  "worth it for long or many clips)")
    output: str = option("", "folder for the WAV files, PNG and JSON (empty: <out-dir>/generate)")

    def check(self) -> None:
        if self.n_samples < 1 or self.length < 1 or self.gen_batch < 1:
            raise ConfigError("n_samples, length and gen_batch must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if bool(self.prime) != bool(self.prime_samples):
            raise ConfigError("--prime and --prime-samples go together")
        if not 0 <= self.prime_samples <= self.length:
            raise ConfigError(f"prime_samples must lie in [0, length={self.length}], got {self.prime_samples}")


@dataclass
class ScoreOptions:
    """The WAV files to score."""

    title = "score"
    score_dir: str = option("", "folder of WAV files to score (required)")

    def check(self) -> None:
        if not self.score_dir:
            raise ConfigError("score needs --score-dir, a folder of WAV files")


def _one_weights_source(cfg) -> None:
    if cfg.weights and cfg.official:
        raise ConfigError("give either --weights or --official, not both")


AudioTrain = compose("AudioTrain", RunOptions, SeedOptions, AudioData, WavReading, ModelOptions, TrainOptions,
                     EvalOptions, DeviceOptions, defaults=dict(
                         model="sashimi_small", steps=300, batch_size=8, lr=4e-3, warmup_steps=20, weight_decay=0.0,
                         eval_every=100, log_every=25),
                     doc="`ssmkit audio train`: WAV data, SaShiMi and training.")
AudioGenerate = compose("AudioGenerate", RunOptions, WeightsOptions, OfficialWeights, GenerateOptions, SeedOptions,
                        doc="`ssmkit audio generate`: a trained run (or official weights) and what to sample.")
AudioScore = compose("AudioScore", RunOptions, WeightsOptions, OfficialWeights, ScoreOptions, WavReading, EvalOptions,
                     doc="`ssmkit audio score`: the NLL of every WAV file of a folder.")


def _clips(cfg) -> tuple[list[str], list[torch.Tensor]]:
    """(names, coded clips) of the configured data."""
    if not cfg.data_dir:
        if cfg.codec != "mu-law" or cfg.sample_rate != 16000:
            raise ConfigError("the embedded digits are 16 kHz mu-law; give --data-dir for other settings")
        names, codes = load_digits()
        return names, list(codes)
    names, waves = load_wav_folder(cfg.data_dir, cfg.sample_rate, cfg.skip_bad)
    return names, [encode(w, cfg.codec).to(torch.uint8) for w in waves]


class AudioApp(Application):
    """SaShiMi next-sample prediction; NLL in bits per sample against the uniform and unigram baselines."""

    name = "audio"
    help = "SaShiMi waveform models on WAV folders or spoken digits (train, eval, generate, score)"
    train_config = AudioTrain
    data_groups = (AudioData, WavReading)
    metrics = {"nll_bits": "min", "unigram_bits": "min", "uniform_bits": "min"}

    def setup(self, cfg) -> RunSpec:
        names, clips = _clips(cfg)
        if cfg.eval_list:
            train, held = split_by_list(names, cfg.eval_list)
        else:
            train, held = split_by_speaker(names, cfg.eval_fraction, cfg.seed, cfg.speaker_pattern)
        if not train or not held:
            raise ConfigError(f"the split leaves {len(train)} training and {len(held)} eval files")
        pick = lambda idx: ([clips[i] for i in idx], [names[i] for i in idx])  # noqa: E731
        (train_clips, train_names), (eval_clips, eval_names) = pick(train), pick(held)
        eval_set = ClipWindows(eval_clips, cfg.window, cfg.short, eval_names)
        if 0 < cfg.eval_windows < len(eval_set):
            eval_set = Subset(eval_set, torch.linspace(0, len(eval_set) - 1, cfg.eval_windows).round().long().tolist())
        # the baseline's code distribution, from the training data only
        meta = {"unigram_log2": unigram_log2(train_clips).tolist()}
        source = cfg.data_dir or "the embedded spoken digits"
        return RunSpec(ClipWindows(train_clips, cfg.window, cfg.short, train_names), eval_set, meta,
                       f"{len(eval_set)} windows of the {len(eval_names)} held-out files of {source}")

    def build_model(self, ctx: RunContext):
        return build_registered(ctx.cfg)

    def train_loss(self, model, batch, ctx: RunContext) -> torch.Tensor:
        logits = model(batch["inputs"])
        return F.cross_entropy(logits.float().transpose(1, 2), batch["targets"], ignore_index=IGNORE)

    def eval_step(self, model, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        bits, count = sequence_bits(model(batch["inputs"]), batch["targets"])
        targets = batch["targets"].clamp_min(0)
        log2 = torch.tensor(ctx.meta["unigram_log2"], dtype=torch.float64, device=targets.device)
        unigram = -log2[targets].float() * (batch["targets"] != IGNORE)
        return {"bits": bits, "unigram": unigram.sum(1), "count": count.float()}

    def compute_metrics(self, outputs: dict[str, torch.Tensor], ctx: RunContext) -> dict[str, float]:
        count = outputs["count"].double().sum().item()
        return {"nll_bits": outputs["bits"].double().sum().item() / count,
                "unigram_bits": outputs["unigram"].double().sum().item() / count, "uniform_bits": 8.0}

    def commands(self) -> list[Command]:
        return [*train_and_eval(self),
                Command("generate", "sample clips with the O(1)-per-sample recurrence; writes WAV files, a "
                                    "waveform/spectrogram PNG and samples/s", AudioGenerate, generate),
                Command("score", "NLL in bits per sample of every WAV file of --score-dir", AudioScore, score)]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = dict(steps=4, batch_size=2, window=256, model_kwargs="d_model=8,n_layers=1,d_state=4", warmup_steps=1,
                     eval_every=0, log_every=2, eval_batch_size=16, eval_windows=16) if smoke else dict(
            steps=120, batch_size=8, window=512, model_kwargs="n_layers=1", lr=6e-3, warmup_steps=10, eval_every=60,
            log_every=20, eval_batch_size=32, eval_windows=96)
        cfg = AudioTrain(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        run = runner.train()
        gcfg = AudioGenerate(out_dir=cfg.out_dir, n_samples=2 if smoke else 3, length=512 if smoke else 6000,
                             temperature=0.9)
        gcfg.validate()
        model = run.model.cpu()
        gen = sample_clips(gcfg, model, cfg, RunFolder(cfg.out_dir) / "generate")
        m = run.metrics
        n_params = sum(p.numel() for p in model.parameters())
        mc = model.config
        text = (
            f"SaShiMi (`SashimiLM`: three resolutions with x4 poolings, {mc.n_layers} [S4D, feed-forward] "
            f"pair(s) per stage, H={mc.d_model}, N={mc.d_state}; {n_params:,} parameters) trained as an "
            f"autoregressive model of 8-bit mu-law samples on the embedded spoken digits (espeak-ng voices "
            f"saying zero..nine, 16 kHz), windows of {cfg.window} samples, {run.step} AdamW steps of "
            f"{cfg.batch_size} windows on {runner.device.type}. The eval voices are never seen in training.\n\n"
            f"NLL is in bits per sample on the held-out voices: 8 bits is a uniform guess, the unigram "
            f"baseline is the entropy of the training codes' histogram (what a model blind to time can "
            f"reach). The clips below ({gcfg.length} samples each, temperature {gcfg.temperature}) were "
            f"sampled with the recurrent step, {gen['samples_per_s']:,.0f} samples/s on CPU. After a CPU-minute "
            f"of training they are mostly silence with short bursts (half of every training clip is the "
            f"silent padding after the word); the held-out NLL is the number to judge the model by. "
            f"Run folder: `{run.out_dir}`.")
        metrics = {"NLL (bits/sample, model)": m["nll_bits"], "unigram baseline (bits/sample)": m["unigram_bits"],
                   "uniform baseline (bits/sample)": m["uniform_bits"],
                   "generation speed (samples/s)": round(gen["samples_per_s"]),
                   "train steps": run.step, "training time (s)": round(run.wall_s, 1)}
        runner.say(f"audio: nll {m['nll_bits']:.3f} bits/sample vs unigram {m['unigram_bits']:.3f} and uniform 8; "
                   f"generation {gen['samples_per_s']:.0f} samples/s")
        rows = [[Path(w).name, f"{b:.3f}"] for w, b in zip(gen["wavs"], gen["bits_per_sample"])]
        table = Table("Generated clips (their NLL under the model, bits/sample)", ["file", "bits/sample"], rows)
        return ReportSection("Waveform generation with SaShiMi (ssmkit audio)", text, metrics,
                             images=[*run.plots, Path(gen["png"])], audio=[Path(w) for w in gen["wavs"]],
                             tables=[table])


application = AudioApp()


# ----------------------------------------------------------------------------------------------
# generate and score


def _model_and_data(cfg):
    """(model, the data options it goes with, the folder outputs go to) of --official or of the run."""
    _one_weights_source(cfg)
    folder = RunFolder.of(cfg, application.name)
    if cfg.official:
        return load_official("sashimi", cfg.official, dt_transform=cfg.official_dt).eval(), AudioTrain(), folder
    run = load_run(application, cfg)
    return run.model, run.cfg, run.folder


def sample_clips(cfg, model, data_cfg, folder: Path) -> dict:
    """Sample cfg.n_samples clips from `model`; writes sample_XX.wav, samples.png and generate.json into
    `folder` and returns the record (paths, bits/sample of each clip, samples/s)."""
    prime = None
    if cfg.prime:
        prime = encode(read_wav(cfg.prime, data_cfg.sample_rate), data_cfg.codec)
        if len(prime) < cfg.prime_samples:
            raise ConfigError(f"{cfg.prime}: {len(prime)} samples, fewer than --prime-samples {cfg.prime_samples}")
        prime = prime[:cfg.prime_samples]
    tokens, bits, start = [], [], time.perf_counter()
    for first in range(0, cfg.n_samples, cfg.gen_batch):
        batch = min(cfg.gen_batch, cfg.n_samples - first)
        out = sample_model(model, batch, cfg.length, cfg.temperature, cfg.top_p, seed=cfg.seed + first, prime=prime,
                           compile=cfg.compile)
        tokens.append(out.tokens.cpu())
        bits.append(-out.log_likelihood.cpu() * BITS_PER_NAT / max(1, cfg.length - cfg.prime_samples))
    wall = time.perf_counter() - start
    tokens = torch.cat(tokens)
    folder = Path(folder)
    waves = [decode(t, data_cfg.codec) for t in tokens]
    wavs = [str(write_wav(folder / f"sample_{i:02d}.wav", w, data_cfg.sample_rate)) for i, w in enumerate(waves)]
    png = save_waveform_figure(folder / "samples.png", waves[:8], data_cfg.sample_rate,
                               [f"sample_{i:02d}" for i in range(min(8, len(waves)))])
    record = {"wavs": wavs, "png": str(png), "bits_per_sample": torch.cat(bits).tolist(),
              "samples_per_s": cfg.n_samples * cfg.length / wall, "wall_s": wall, "length": cfg.length,
              "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
              "prime": cfg.prime, "prime_samples": cfg.prime_samples}
    (folder / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"audio generate: {cfg.n_samples} clips of {cfg.length} samples at {record['samples_per_s']:.0f} samples/s; "
          f"wrote {folder}", flush=True)
    return record


def generate(cfg) -> dict:
    """`ssmkit audio generate`: clips from the run in --out-dir (or --official weights)."""
    model, data_cfg, folder = _model_and_data(cfg)
    return sample_clips(cfg, model, data_cfg, Path(cfg.output) if cfg.output else folder / "generate")


@torch.no_grad()
def score(cfg) -> dict:
    """NLL in bits per sample of each WAV file of cfg.score_dir, in the windows of the run's data options;
    writes score.json into the run folder and returns {"files": {name: bits}, "nll_bits": overall}."""
    model, data_cfg, folder = _model_and_data(cfg)
    names, waves = load_wav_folder(cfg.score_dir, data_cfg.sample_rate, cfg.skip_bad)
    files, total_bits, total_count = {}, 0.0, 0
    chunk = cfg.eval_batch_size or 16
    for name, wave in zip(names, waves):
        windows = ClipWindows([encode(wave, data_cfg.codec)], data_cfg.window, data_cfg.short, [name])
        bits, count = 0.0, 0
        for first in range(0, len(windows), chunk):
            items = [windows[i] for i in range(first, min(len(windows), first + chunk))]
            b, c = sequence_bits(model(torch.stack([it["inputs"] for it in items])),
                                 torch.stack([it["targets"] for it in items]))
            bits, count = bits + b.sum().item(), count + c.sum().item()
        files[name] = bits / count
        total_bits, total_count = total_bits + bits, total_count + count
    weights = cfg.official or str(folder.trained_weights(cfg.weights))
    result = {"files": files, "nll_bits": total_bits / total_count, "weights": weights, "data": cfg.score_dir}
    path = folder.write_json("score.json", result)
    print(f"audio score: {len(files)} files of {cfg.score_dir}, {result['nll_bits']:.3f} bits/sample; wrote {path}",
          flush=True)
    return result
