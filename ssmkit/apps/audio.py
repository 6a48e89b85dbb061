"""`ssmkit audio`: autoregressive waveform models (SaShiMi) on 8-bit audio: train, eval, generate, score.

Data: a folder of WAV files (--data-dir; read with soundfile, resampled to --sample-rate, quantised to
256 mu-law or linear codes), or by default the embedded spoken digits (espeak-ng, 16 kHz, one second
each; `ssmkit.audio.make_digits`). The split is speaker-disjoint (the speaker is read from the file
name) or given by --eval-list. Training minimises the next-sample cross-entropy; evaluation reports
the NLL in bits per sample next to two baselines: the uniform 8 bits and the unigram entropy of the
training codes (a model that learned nothing about time cannot beat it).

`generate` samples --n-samples clips with the O(1)-per-sample recurrence (temperature, top-p, seed,
priming from the start of a WAV file; --compile to torch.compile the step first) and writes WAV files,
a waveform + mel-spectrogram PNG and the samples/s; `score` reports the NLL of every WAV file of a folder
under trained weights. Both also take an official state-spaces/s4 checkpoint (--official sashimi_sc09.pt).
The published SC09 model is `--d-model 64 --n-layers 8 --d-state 64 --kernel dplr --n-ssm 1`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ssmkit.apps.config import ConfigError, TrainConfig, option
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Application, Command, RunError, Runner, load_weights
from ssmkit.audio.data import (IGNORE, AudioDataError, ClipWindows, decode, encode, load_digits, load_wav_folder, read_wav,
                               split_by_list, split_by_speaker, write_wav)
from ssmkit.audio.checkpoints import CheckpointError, load_official_sashimi
from ssmkit.audio.generate import generate as sample_model
from ssmkit.audio.sashimi import SashimiConfig, SashimiLM

__all__ = ["AudioConfig", "GenerateConfig", "ScoreConfig", "AudioApp", "application", "generate", "score",
           "save_waveform_figure"]

_BITS = 1 / math.log(2)


@dataclass
class AudioConfig(TrainConfig):
    """WAV data, SaShiMi size and (redeclared) training defaults: a few CPU minutes on the digits."""

    data_dir: str = option("", "folder of WAV files (empty: the embedded espeak-ng spoken digits)")
    sample_rate: int = option(16000, "sample rate the audio is resampled to")
    codec: str = option("mu-law", "8-bit quantisation of the samples", ("mu-law", "linear"))
    window: int = option(4096, "samples per training window (a multiple of 16; SC09 uses 16000)")
    short: str = option("pad", "clips shorter than the window: pad them, skip them or stop with an error",
                        ("pad", "skip", "error"))
    skip_bad: bool = option(False, "skip non-WAV and unreadable files with a warning instead of stopping")
    eval_list: str = option("", "text file naming the eval files (relative paths); empty: a speaker split")
    eval_fraction: float = option(0.25, "fraction of the speakers held out for evaluation")
    speaker_pattern: str = option(r"^([^_]+)_", "regex whose group 1 is the speaker in a file name")
    eval_windows: int = option(0, "evaluate on at most this many eval windows, evenly spaced (0: all)")
    d_model: int = option(32, "width H at full resolution (doubles at each pooling)")
    n_layers: int = option(2, "[S4, feed-forward] pairs per stage (the paper: 8)")
    d_state: int = option(16, "S4 state size N (the paper: 64)")
    kernel: str = option("s4d", "S4 state matrix: diagonal S4D or the DPLR (Hurwitz) S4 of the paper",
                         ("s4d", "dplr"))
    n_ssm: int = option(0, "state matrices shared over channels (0: one per channel; the paper: 1)")
    glu: bool = option(True, "S4 block output through Linear(H, 2H) + GLU")
    dropout: float = option(0.0, "dropout inside the blocks")
    steps: int = option(300, "optimizer steps to train for")
    batch_size: int = option(8, "samples per optimizer step, summed over all processes and accumulation steps")
    lr: float = option(4e-3, "peak learning rate of AdamW")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = option(0.0, "AdamW weight decay (never on norms, biases, SSM parameters, D)")
    eval_every: int = option(100, "evaluate every N steps (0: only at the end)")
    log_every: int = option(25, "print and log the training metrics every N steps")

    def validate(self) -> None:
        super().validate()
        if self.eval_windows < 0:
            raise ConfigError(f"eval_windows must not be negative, got {self.eval_windows}")
        for name in ("sample_rate", "d_model", "n_layers", "d_state"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.window < 16 or self.window % 16:
            raise ConfigError(f"window must be a positive multiple of 16 (two x4 poolings), got {self.window}")
        if self.d_state % 2:
            raise ConfigError(f"d_state must be even, got {self.d_state}")
        if self.n_ssm < 0 or (self.n_ssm and self.d_model % self.n_ssm):
            raise ConfigError(f"n_ssm ({self.n_ssm}) must be 0 or divide d_model ({self.d_model})")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")


@dataclass
class TrainedModelConfig(AudioConfig):
    """The weights `generate` and `score` run: ssmkit's own, or an official checkpoint."""

    weights: str = option("", "weights to load (empty: out_dir/best.safetensors, else out_dir/model.safetensors)")
    official: str = option("", "official state-spaces/s4 SaShiMi checkpoint to load instead of --weights "
                                "(a .pt state dict such as sashimi_sc09.pt, or a .ckpt); its sizes come from the "
                                "file, so --d-model/--n-layers/... are ignored; the SC09 model expects 16 kHz "
                                "8-bit mu-law")
    official_dt: str = option("softplus", "dt transform of the --official file: softplus (V4 training configs) "
                                          "or exp (V3 checkpoints converted with convert_v3_to_v4.py)",
                              ("softplus", "exp"))

    def validate(self) -> None:
        super().validate()
        if self.weights and self.official:
            raise ConfigError("give either --weights or --official, not both")


@dataclass
class GenerateConfig(TrainedModelConfig):
    """`ssmkit audio generate`: weights plus what to sample."""

    n_samples: int = option(4, "clips to generate")
    length: int = option(16000, "samples per clip (including the primed ones)")
    temperature: float = option(1.0, "softmax temperature (0: greedy)")
    top_p: float = option(1.0, "nucleus sampling: keep the most likely codes up to this probability mass")
    prime: str = option("", "WAV file whose first --prime-samples samples start every clip")
    prime_samples: int = option(0, "samples taken from --prime")
    gen_batch: int = option(16, "clips generated together")
    compile: bool = option(False, "torch.compile the recurrent step first (20-40 s per batch size on a 2-core "
                                  "CPU; then 4-6x the samples/s: worth it for long or many clips)")
    output: str = option("", "folder for the WAV files, PNG and JSON (empty: out_dir/generate)")

    def validate(self) -> None:
        super().validate()
        if self.n_samples < 1 or self.length < 1 or self.gen_batch < 1:
            raise ConfigError("n_samples, length and gen_batch must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if bool(self.prime) != bool(self.prime_samples):
            raise ConfigError("--prime and --prime-samples go together")
        if not 0 <= self.prime_samples <= self.length:
            raise ConfigError(f"prime_samples must lie in [0, length={self.length}], got {self.prime_samples}")


@dataclass
class ScoreConfig(TrainedModelConfig):
    """`ssmkit audio score`: NLL of every WAV file of a folder under trained weights."""

    score_dir: str = option("", "folder of WAV files to score (required)")

    def validate(self) -> None:
        super().validate()
        if not self.score_dir:
            raise ConfigError("score needs --score-dir, a folder of WAV files")


def _model_config(cfg: AudioConfig) -> SashimiConfig:
    return SashimiConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, d_state=cfg.d_state, kernel=cfg.kernel,
                         n_ssm=cfg.n_ssm or None, glu=cfg.glu, dropout=cfg.dropout)


@contextlib.contextmanager
def _data_errors():
    """Bad audio input ends a command with its message (exit code 1), not a traceback."""
    try:
        yield
    except AudioDataError as error:
        raise RunError(str(error)) from None


def _clips(cfg: AudioConfig) -> tuple[list[str], list[torch.Tensor]]:
    """(names, coded clips) of the configured data."""
    if not cfg.data_dir:
        names, codes = load_digits()
        if cfg.codec != "mu-law" or cfg.sample_rate != 16000:
            raise ConfigError("the embedded digits are 16 kHz mu-law; give --data-dir for other settings")
        return names, list(codes)
    names, waves = load_wav_folder(cfg.data_dir, cfg.sample_rate, cfg.skip_bad)
    return names, [encode(w, cfg.codec).to(torch.uint8) for w in waves]


def _unigram_log2(clips: list[torch.Tensor]) -> torch.Tensor:
    """log2 of the add-one-smoothed frequency of each of the 256 codes over `clips`."""
    counts = torch.ones(256, dtype=torch.float64)
    for clip in clips:
        counts += torch.bincount(clip.long(), minlength=256).double()
    return torch.log2(counts / counts.sum())


def _weights_path(cfg) -> Path:
    if cfg.weights:
        return Path(cfg.weights)
    out = Path(cfg.out_dir or "runs/audio")
    return out / "best.safetensors" if (out / "best.safetensors").exists() else out / "model.safetensors"


def _load_model(cfg) -> SashimiLM:
    if cfg.official:
        try:
            return load_official_sashimi(cfg.official, cfg.official_dt)
        except CheckpointError as error:
            raise RunError(str(error)) from None
    model = SashimiLM(_model_config(cfg))
    load_weights(model, _weights_path(cfg))
    return model.eval()


def _sequence_bits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in bits, counted samples) per sequence, pads (-100) excluded."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) * _BITS, (targets != IGNORE).sum(1)


class AudioApp(Application):
    """SaShiMi next-sample prediction; NLL in bits per sample against the uniform and unigram baselines."""

    name = "audio"
    help = "SaShiMi waveform models on WAV folders or spoken digits (train, eval, generate, score)"
    config = AudioConfig
    metrics = {"nll_bits": "min", "unigram_bits": "min", "uniform_bits": "min"}

    def build_model(self, cfg: AudioConfig) -> SashimiLM:
        return SashimiLM(_model_config(cfg))

    def build_datasets(self, cfg: AudioConfig) -> tuple[Dataset, Dataset]:
        with _data_errors():
            return self._datasets(cfg)

    def _datasets(self, cfg: AudioConfig) -> tuple[Dataset, Dataset]:
        names, clips = _clips(cfg)
        if cfg.eval_list:
            train, held = split_by_list(names, cfg.eval_list)
        else:
            train, held = split_by_speaker(names, cfg.eval_fraction, cfg.seed, cfg.speaker_pattern)
        if not train or not held:
            raise ConfigError(f"the split leaves {len(train)} training and {len(held)} eval files")
        pick = lambda idx: ([clips[i] for i in idx], [names[i] for i in idx])  # noqa: E731
        (train_clips, train_names), (eval_clips, eval_names) = pick(train), pick(held)
        self._unigram = _unigram_log2(train_clips)  # the baseline's code distribution, from training data only
        eval_set = ClipWindows(eval_clips, cfg.window, cfg.short, eval_names)
        if 0 < cfg.eval_windows < len(eval_set):
            eval_set = Subset(eval_set, torch.linspace(0, len(eval_set) - 1, cfg.eval_windows).round().long().tolist())
        return ClipWindows(train_clips, cfg.window, cfg.short, train_names), eval_set

    def train_loss(self, model, batch) -> torch.Tensor:
        logits = model(batch["inputs"])
        return F.cross_entropy(logits.float().transpose(1, 2), batch["targets"], ignore_index=IGNORE)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        bits, count = _sequence_bits(model(batch["inputs"]), batch["targets"])
        targets = batch["targets"].clamp_min(0)
        unigram = -self._unigram.to(targets.device)[targets].float() * (batch["targets"] != IGNORE)
        return {"bits": bits, "unigram": unigram.sum(1), "count": count.float()}

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        count = outputs["count"].double().sum().item()
        return {"nll_bits": outputs["bits"].double().sum().item() / count,
                "unigram_bits": outputs["unigram"].double().sum().item() / count, "uniform_bits": 8.0}

    def commands(self) -> list[Command]:
        return [*super().commands(),
                Command("generate", "sample clips with the O(1)-per-sample recurrence; writes WAV files, a "
                                    "waveform/spectrogram PNG and samples/s", GenerateConfig, generate),
                Command("score", "NLL in bits per sample of every WAV file of --score-dir", ScoreConfig, score)]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = dict(steps=4, batch_size=2, window=256, d_model=8, n_layers=1, d_state=4, warmup_steps=1,
                     eval_every=0, log_every=2, eval_batch_size=16, eval_windows=16) if smoke else dict(
            steps=120, batch_size=8, window=512, d_model=32, n_layers=1, d_state=16, lr=6e-3, warmup_steps=10,
            eval_every=60, log_every=20, eval_batch_size=32, eval_windows=96)
        cfg = AudioConfig(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        run = runner.train()
        length = 512 if smoke else 6000
        gcfg = GenerateConfig(**{**dataclasses.asdict(cfg), "overwrite": False}, n_samples=2 if smoke else 3,
                              length=length, temperature=0.9, output=str(Path(cfg.out_dir) / "generate"))
        gen = generate(gcfg, model=runner.model.cpu().eval())
        m = run.metrics
        n_params = sum(p.numel() for p in runner.model.parameters())
        text = (
            f"SaShiMi (`SashimiLM`: three resolutions with x4 poolings, {cfg.n_layers} [S4D, feed-forward] "
            f"pair(s) per stage, H={cfg.d_model}, N={cfg.d_state}; {n_params:,} parameters) trained as an "
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


def save_waveform_figure(path: Path, waves: list[torch.Tensor], sample_rate: int, titles: list[str]) -> Path:
    """PNG with one column per clip: the waveform above its log mel spectrogram (torchaudio)."""
    import torchaudio.transforms as T
    from matplotlib.figure import Figure

    mel = T.MelSpectrogram(sample_rate, n_fft=512, hop_length=128, n_mels=64)
    fig = Figure(figsize=(3.2 * len(waves), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(waves), squeeze=False)
    for j, (wave, title) in enumerate(zip(waves, titles)):
        seconds = torch.arange(len(wave)) / sample_rate
        axes[0, j].plot(seconds.numpy(), wave.numpy(), linewidth=0.4)
        axes[0, j].set_ylim(-1, 1)
        axes[0, j].set_title(title, fontsize=8)
        spectrum = torch.log10(mel(F.pad(wave, (0, max(0, 513 - len(wave))))) + 1e-6)  # >= one n_fft frame
        axes[1, j].imshow(spectrum.numpy(), origin="lower", aspect="auto",
                          extent=(0, len(wave) / sample_rate, 0, spectrum.shape[0]))
        axes[1, j].set_xlabel("seconds")
    axes[0, 0].set_ylabel("amplitude")
    axes[1, 0].set_ylabel("mel bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def generate(cfg: GenerateConfig, model: SashimiLM | None = None) -> dict:
    """Sample cfg.n_samples clips; writes sample_XX.wav, samples.png and generate.json into the output
    folder and returns the record (paths, bits/sample of each clip, samples/s)."""
    cfg.validate()
    model = _load_model(cfg) if model is None else model.eval()
    prime = None
    if cfg.prime:
        with _data_errors():
            prime = encode(read_wav(cfg.prime, cfg.sample_rate), cfg.codec)
        if len(prime) < cfg.prime_samples:
            raise ConfigError(f"{cfg.prime}: {len(prime)} samples, fewer than --prime-samples {cfg.prime_samples}")
        prime = prime[:cfg.prime_samples]
    tokens, bits, start = [], [], time.perf_counter()
    for first in range(0, cfg.n_samples, cfg.gen_batch):
        batch = min(cfg.gen_batch, cfg.n_samples - first)
        out = sample_model(model, batch, cfg.length, cfg.temperature, cfg.top_p, seed=cfg.seed + first, prime=prime,
                           compile=cfg.compile)
        tokens.append(out.tokens.cpu())
        bits.append(-out.log_likelihood.cpu() * _BITS / max(1, cfg.length - cfg.prime_samples))
    wall = time.perf_counter() - start
    tokens = torch.cat(tokens)
    folder = Path(cfg.output) if cfg.output else Path(cfg.out_dir or "runs/audio") / "generate"
    waves = [decode(t, cfg.codec) for t in tokens]
    wavs = [str(write_wav(folder / f"sample_{i:02d}.wav", w, cfg.sample_rate)) for i, w in enumerate(waves)]
    png = save_waveform_figure(folder / "samples.png", waves[:8], cfg.sample_rate,
                               [f"sample_{i:02d}" for i in range(min(8, len(waves)))])
    record = {"wavs": wavs, "png": str(png), "bits_per_sample": torch.cat(bits).tolist(),
              "samples_per_s": cfg.n_samples * cfg.length / wall, "wall_s": wall, "length": cfg.length,
              "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
              "prime": cfg.prime, "prime_samples": cfg.prime_samples}
    (folder / "generate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"audio generate: {cfg.n_samples} clips of {cfg.length} samples at {record['samples_per_s']:.0f} samples/s; "
          f"wrote {folder}", flush=True)
    return record


@torch.no_grad()
def score(cfg: ScoreConfig, model: SashimiLM | None = None) -> dict:
    """NLL in bits per sample of each WAV file of cfg.score_dir (windows of cfg.window, as in training);
    writes score.json into out_dir and returns {"files": {name: bits}, "nll_bits": overall}."""
    cfg.validate()
    model = _load_model(cfg) if model is None else model.eval()
    with _data_errors():
        names, waves = load_wav_folder(cfg.score_dir, cfg.sample_rate, cfg.skip_bad)
    files, total_bits, total_count = {}, 0.0, 0
    for name, wave in zip(names, waves):
        with _data_errors():
            windows = ClipWindows([encode(wave, cfg.codec)], cfg.window, cfg.short, [name])
        bits, count = 0.0, 0
        chunk = cfg.eval_batch_size or 16
        for first in range(0, len(windows), chunk):
            items = [windows[i] for i in range(first, min(len(windows), first + chunk))]
            b, c = _sequence_bits(model(torch.stack([it["inputs"] for it in items])),
                                  torch.stack([it["targets"] for it in items]))
            bits, count = bits + b.sum().item(), count + c.sum().item()
        files[name] = bits / count
        total_bits, total_count = total_bits + bits, total_count + count
    result = {"files": files, "nll_bits": total_bits / total_count,
              "weights": cfg.official or str(_weights_path(cfg))}
    out = Path(cfg.out_dir or "runs/audio")
    out.mkdir(parents=True, exist_ok=True)
    (out / "score.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"audio score: {len(files)} files, {result['nll_bits']:.3f} bits/sample; wrote {out / 'score.json'}", flush=True)
    return result
