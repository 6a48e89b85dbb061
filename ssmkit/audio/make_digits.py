"""Synthesise spoken digits "zero".."nine" with espeak-ng: an offline stand-in for SC09.

Each clip is espeak-ng's output for one digit word with one voice (accent + variant), speed and pitch,
with its leading silence trimmed, resampled from 22,050 Hz to 16 kHz and padded or cut to one second.
espeak-ng is deterministic, so the same arguments give the same clips. File names are
`<accent>-<variant>_<digit>_s<speed>_p<pitch>.wav`: the voice is the speaker key of speaker splits.

    python -m ssmkit.audio.make_digits --out data/digits          # the full set: 5,040 WAV files
    python -m ssmkit.audio.make_digits --fixture                  # the small set shipped in the package

Needs the `espeak-ng` program (Debian: apt-get install espeak-ng); nothing else is downloaded.
"""
from __future__ import annotations

import argparse
import io
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from ssmkit.audio.data import DIGITS_FIXTURE, mu_law_encode, write_wav

__all__ = ["DIGITS", "FULL", "FIXTURE", "synthesize", "make_set"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000
# (accents, variants, speeds in words/min, pitches 0-99)
FULL = (("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029"),
        ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f4", "f5", "klatt", "whisper"), (120, 160, 200), (35, 65))
FIXTURE = (("en-us", "en-gb", "en-gb-scotland", "en-029"), ("m1", "m3", "f2", "f4"), (160,), (50,))


def synthesize(word: str, voice: str, speed: int, pitch: int) -> torch.Tensor:
    """One second of 16 kHz float32 audio of `word`, leading silence trimmed, padded or cut."""
    import soundfile as sf
    import torchaudio.functional as AF

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                         check=True, capture_output=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    wave = AF.resample(torch.from_numpy(data), rate, SAMPLE_RATE)
    loud = (wave.abs() > 0.005 * wave.abs().max()).nonzero()
    wave = wave[loud[0, 0]:] if len(loud) else wave
    return torch.nn.functional.pad(wave, (0, max(0, SAMPLE_RATE - len(wave))))[:SAMPLE_RATE]


def make_set(grid) -> list[tuple[str, torch.Tensor]]:
    """(name, waveform) for every accent x variant x speed x pitch x digit of `grid`."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    accents, variants, speeds, pitches = grid
    clips = []
    for accent, variant, speed, pitch, digit in itertools.product(accents, variants, speeds, pitches, DIGITS):
        name = f"{accent}-{variant}_{digit}_s{speed}_p{pitch}"
        clips.append((name, synthesize(digit, f"{accent}+{variant}", speed, pitch)))
    return clips


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="folder for the full set of WAV files")
    parser.add_argument("--fixture", nargs="?", const=str(DIGITS_FIXTURE), default="",
                        help=f"write the small mu-law fixture (.npz) instead (default path: {DIGITS_FIXTURE})")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.fixture):
        parser.error("give exactly one of --out and --fixture")
    if args.fixture:
        clips = make_set(FIXTURE)
        codes = np.stack([mu_law_encode(w).to(torch.uint8).numpy() for _, w in clips])
        np.savez_compressed(args.fixture, codes=codes, names=np.array([n for n, _ in clips]))
        print(f"wrote {len(clips)} clips to {args.fixture}")
    else:
        for name, wave in make_set(FULL):
            write_wav(Path(args.out) / f"{name}.wav", wave, SAMPLE_RATE)
        print(f"wrote {len(FULL[0]) * len(FULL[1]) * len(FULL[2]) * len(FULL[3]) * len(DIGITS)} WAV files to {args.out}")


if __name__ == "__main__":
    main()
