"""Waveform data: WAV folders, 8-bit quantisation (mu-law or linear), speaker-disjoint splits, windows.

- WAV files are read with soundfile (mono float32 in [-1, 1]; stereo is averaged with a warning) and
  resampled with torchaudio when their rate differs from the target rate.
- Mu-law follows the papers and torchaudio: q = floor((sign(x)·ln(1+μ|x|)/ln(1+μ) + 1)/2·μ + 1/2) with
  μ = 255, so silence maps to 128; linear quantisation is q = round((x + 1)/2·255).
- Splits keep every speaker on one side: the speaker is a regex group of the file name (default: the
  text before the first '_', as in SC09's `<speaker>_nohash_<n>.wav`), or a list file names the eval files.
- `ClipWindows` cuts coded clips into fixed windows and makes teacher-forcing pairs:
  inputs = [128, q_0, ..., q_{L-2}], targets = q, with padding targets set to -100 (ignored by the loss).
- The embedded default data (`load_digits`) are spoken digits synthesised by espeak-ng (see
  `ssmkit.audio.make_digits`), stored as mu-law bytes in the package.
"""
from __future__ import annotations

import math
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssmkit.errors import DataError

__all__ = ["MU_LAW_ZERO", "IGNORE", "DIGITS_FIXTURE", "mu_law_encode", "mu_law_decode",
           "linear_encode", "linear_decode", "encode", "decode", "read_wav", "write_wav", "wav_files",
           "load_wav_folder", "speaker_of", "split_by_speaker", "split_by_list", "ClipWindows", "load_digits"]

MU_LAW_ZERO = 128  # the code of silence (and the start token)
IGNORE = -100  # target of padded positions
DIGITS_FIXTURE = Path(__file__).with_name("digits_fixture.npz")
_MU = 255.0
_TEXT_SUFFIXES = {".txt", ".csv", ".md", ".json", ".toml"}


def mu_law_encode(x: torch.Tensor) -> torch.Tensor:
    """Waveform in [-1, 1] -> int64 codes 0..255 (0.0 -> 128)."""
    x = x.clamp(-1, 1)
    companded = torch.sign(x) * torch.log1p(_MU * x.abs()) / math.log1p(_MU)
    return ((companded + 1) / 2 * _MU + 0.5).to(torch.int64)


def mu_law_decode(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..255 -> waveform in [-1, 1] (float32), the inverse of `mu_law_encode` up to its rounding."""
    companded = q.to(torch.float32) / _MU * 2 - 1
    return torch.sign(companded) * torch.expm1(companded.abs() * math.log1p(_MU)) / _MU


def linear_encode(x: torch.Tensor) -> torch.Tensor:
    """Waveform in [-1, 1] -> int64 codes 0..255 by uniform rounding (0.0 -> 128)."""
    return torch.round((x.clamp(-1, 1) + 1) / 2 * _MU).to(torch.int64)


def linear_decode(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) / _MU * 2 - 1


def encode(x: torch.Tensor, codec: str) -> torch.Tensor:
    """`codec` 'mu-law' or 'linear'."""
    return {"mu-law": mu_law_encode, "linear": linear_encode}[codec](x)


def decode(q: torch.Tensor, codec: str) -> torch.Tensor:
    return {"mu-law": mu_law_decode, "linear": linear_decode}[codec](q)


def _decode(path: Path) -> tuple[torch.Tensor, int, int]:
    """(mono float32 samples, sample rate, channels in the file) of a WAV file; channels are averaged."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError for bad files
        raise DataError(f"{path}: not a readable WAV file ({error})") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: the file holds no samples")
    return torch.from_numpy(data.mean(1)), rate, data.shape[1]


def _resample(wave: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    if rate == sample_rate:
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, rate, sample_rate)


def read_wav(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform (samples,) of a WAV file at `sample_rate` (resampled, and averaged to mono
    with a warning, when needed)."""
    wave, rate, channels = _decode(Path(path))
    if channels > 1:
        warnings.warn(f"{path}: {channels} channels, averaged to mono", stacklevel=2)
    return _resample(wave, rate, sample_rate)


def write_wav(path: str | Path, wave: torch.Tensor, sample_rate: int) -> Path:
    """Write a mono waveform in [-1, 1] as 16-bit PCM."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.detach().cpu().float().clamp(-1, 1).numpy(), sample_rate, subtype="PCM_16")
    return path


def wav_files(folder: str | Path, skip_bad: bool = False) -> list[Path]:
    """The .wav files under `folder` (recursive, sorted). Other files (except text files such as split
    lists and hidden files) are an error naming them, or skipped with a warning when `skip_bad`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files, others = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.startswith(".") or path.suffix.lower() in _TEXT_SUFFIXES:
            continue
        (files if path.suffix.lower() == ".wav" else others).append(path)
    if others:
        message = f"{folder}: {len(others)} file(s) are not WAV files: {', '.join(map(str, others[:5]))}"
        if not skip_bad:
            raise DataError(message + " (use --skip-bad to skip them)")
        warnings.warn(message + "; skipped", stacklevel=2)
    if not files:
        raise DataError(f"{folder}: no .wav files found")
    return files


def load_wav_folder(folder: str | Path, sample_rate: int, skip_bad: bool = False) -> tuple[list[str], list[torch.Tensor]]:
    """(names relative to `folder`, waveforms) of every WAV file; unreadable files raise, or are
    skipped with a warning when `skip_bad`."""
    folder = Path(folder)
    names, waves, converted = [], [], {"averaged to mono": 0, f"resampled to {sample_rate} Hz": 0}
    for path in wav_files(folder, skip_bad):
        try:
            wave, rate, channels = _decode(path)
        except DataError as error:
            if not skip_bad:
                raise
            warnings.warn(f"{error}; skipped", stacklevel=2)
            continue
        converted["averaged to mono"] += channels > 1
        converted[f"resampled to {sample_rate} Hz"] += rate != sample_rate
        waves.append(_resample(wave, rate, sample_rate))
        names.append(path.relative_to(folder).as_posix())
    if not names:
        raise DataError(f"{folder}: none of the WAV files could be read")
    done = [f"{n} {what}" for what, n in converted.items() if n]
    if done:  # one line for the folder, not one per file
        warnings.warn(f"{folder}: of {len(names)} files, " + " and ".join(done), stacklevel=2)
    return names, waves


def speaker_of(name: str, pattern: str) -> str:
    """The speaker key: group 1 of `pattern` searched in the file name (without folders)."""
    match = re.search(pattern, Path(name).name)
    if match is None or not match.groups():
        raise DataError(f"{name}: no speaker key matching {pattern!r} in the file name; set --speaker-pattern to a "
                        f"regex whose group 1 is the speaker, or list the eval files with --eval-list")
    return match.group(1)


def split_by_speaker(names: list[str], eval_fraction: float, seed: int, pattern: str = r"^([^_]+)_") -> tuple[list[int], list[int]]:
    """(train, eval) indices with no speaker on both sides; round(eval_fraction · speakers) speakers
    (at least one, and one left for training) drawn by `seed` go to eval."""
    speakers = sorted({speaker_of(n, pattern) for n in names})
    if len(speakers) < 2:
        raise DataError(f"need at least 2 speakers for a speaker split, found {speakers}")
    random.Random(seed).shuffle(speakers)
    n_eval = min(len(speakers) - 1, max(1, round(eval_fraction * len(speakers))))
    held_out = set(speakers[:n_eval])
    train = [i for i, n in enumerate(names) if speaker_of(n, pattern) not in held_out]
    held = [i for i, n in enumerate(names) if speaker_of(n, pattern) in held_out]
    return train, held


def split_by_list(names: list[str], list_file: str | Path) -> tuple[list[int], list[int]]:
    """(train, eval) indices: eval = the files named (relative paths, one per line) in `list_file`."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"{list_file}: split list file not found")
    wanted = {line.strip() for line in list_file.read_text().splitlines() if line.strip()}
    missing = wanted - set(names)
    if missing:
        raise DataError(f"{list_file}: names files that are not in the data: {', '.join(sorted(missing)[:5])}")
    return [i for i, n in enumerate(names) if n not in wanted], [i for i, n in enumerate(names) if n in wanted]


class ClipWindows(Dataset):
    """Fixed-length teacher-forcing windows of coded clips (1-D int tensors of codes 0..255).

    Each clip gives its full windows of `window` codes (a remainder after the last one is dropped). A clip
    shorter than `window` is padded (targets -100) with short='pad', dropped with 'skip', or refused
    with 'error'. Items: {"inputs": (window,) long, "targets": (window,) long}.
    """

    def __init__(self, clips: list[torch.Tensor], window: int, short: str = "pad", names: list[str] | None = None):
        if short not in ("pad", "skip", "error"):
            raise ValueError(f"short must be 'pad', 'skip' or 'error', got {short!r}")
        if window < 2:
            raise ValueError(f"window must be at least 2, got {window}")
        self.window = window
        self.items: list[tuple[int, int]] = []  # (clip, start)
        self.clips = clips
        for i, clip in enumerate(clips):
            if len(clip) < window:
                if short == "error":
                    name = names[i] if names else f"clip {i}"
                    raise DataError(f"{name}: {len(clip)} samples, shorter than the window of {window} "
                                         "(pad it with --short pad or skip it with --short skip)")
                if short == "pad":
                    self.items.append((i, 0))
                continue
            self.items += [(i, start) for start in range(0, len(clip) - window + 1, window)]
        if not self.items:
            where = names[0] if names and len(names) == 1 else f"{len(clips)} clip(s)"
            raise DataError(f"{where}: no windows of {window} samples")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clip, start = self.items[index]
        codes = self.clips[clip][start:start + self.window].long()
        targets = torch.full((self.window,), IGNORE, dtype=torch.long)
        targets[:len(codes)] = codes
        inputs = torch.full((self.window,), MU_LAW_ZERO, dtype=torch.long)
        inputs[1:len(codes) + 1] = codes[:self.window - 1]
        return {"inputs": inputs, "targets": targets}


def load_digits(path: str | Path = DIGITS_FIXTURE) -> tuple[list[str], torch.Tensor]:
    """The embedded spoken digits: (file-style names '<voice>_<digit>_...', mu-law codes (clips, 16000) uint8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the digits fixture is missing (make it with python -m ssmkit.audio.make_digits)")
    with np.load(path) as data:
        if "codes" not in data or "names" not in data:
            raise DataError(f"{path}: expected arrays 'codes' and 'names', found {list(data.keys())}")
        codes, names = data["codes"], [str(n) for n in data["names"]]
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[0] != len(names):
        raise DataError(f"{path}: 'codes' must be uint8 (clips, samples) matching 'names', got "
                             f"{codes.dtype} {codes.shape} for {len(names)} names")
    return names, torch.from_numpy(codes)
