"""Audio data: mu-law/linear codecs, WAV folders (bad files, stereo, resampling), splits, windows, fixture."""
import numpy as np
import pytest
import soundfile as sf
import torch

from ssmkit.audio.data import (IGNORE, ClipWindows, linear_decode, linear_encode, load_digits,
                               load_wav_folder, mu_law_decode, mu_law_encode, read_wav, split_by_list,
                               split_by_speaker, wav_files, write_wav)
from ssmkit.errors import DataError


def test_mu_law_round_trip_and_conventions():
    codes = torch.arange(256)
    assert torch.equal(mu_law_encode(mu_law_decode(codes)), codes)
    assert mu_law_encode(torch.tensor(0.0)).item() == 128
    assert mu_law_encode(torch.tensor([-1.0, 1.0])).tolist() == [0, 255]
    x = torch.linspace(-1, 1, 5001)
    q = mu_law_encode(x)
    assert q.dtype == torch.int64 and (q.diff() >= 0).all()
    # within half a bin in the companded domain
    compand = lambda v: torch.sign(v) * torch.log1p(255 * v.abs()) / torch.log1p(torch.tensor(255.0))  # noqa: E731
    assert (compand(mu_law_decode(q)) - compand(x)).abs().max() <= 1 / 255 + 1e-6
    assert mu_law_encode(torch.zeros(2, 3, 4)).shape == (2, 3, 4)


def test_mu_law_matches_torchaudio():
    F = pytest.importorskip("torchaudio.functional")
    x = torch.linspace(-1, 1, 1001)
    assert torch.equal(mu_law_encode(x), F.mu_law_encoding(x, 256))
    torch.testing.assert_close(mu_law_decode(torch.arange(256)), F.mu_law_decoding(torch.arange(256), 256))


def test_linear_codec():
    codes = torch.arange(256)
    assert torch.equal(linear_encode(linear_decode(codes)), codes)
    assert linear_encode(torch.tensor([0.0, -1.0, 1.0])).tolist() == [128, 0, 255]


def _wav(path, samples, rate=16000):
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


def test_wav_round_trip_stereo_and_resampling(tmp_path):
    wave = torch.sin(torch.arange(1600) / 5.0) * 0.5
    write_wav(tmp_path / "a.wav", wave, 16000)
    assert (read_wav(tmp_path / "a.wav", 16000) - wave).abs().max() <= 1 / 32768 + 1e-6
    stereo = np.stack([wave.numpy(), -wave.numpy() * 0.5], 1)
    _wav(tmp_path / "s.wav", stereo)
    with pytest.warns(UserWarning, match="s.wav: 2 channels, averaged to mono"):
        mono = read_wav(tmp_path / "s.wav", 16000)
    torch.testing.assert_close(mono, wave * 0.25, atol=1e-4, rtol=0)
    _wav(tmp_path / "slow.wav", wave.numpy()[::2], rate=8000)
    assert len(read_wav(tmp_path / "slow.wav", 16000)) == 1600


def test_bad_files_are_named_or_skipped(tmp_path):
    with pytest.raises(DataError, match="no .wav files"):
        wav_files(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        wav_files(tmp_path / "missing")
    _wav(tmp_path / "good_1.wav", np.zeros(100))
    (tmp_path / "bad_1.wav").write_bytes(b"RIFF not really a wav")
    (tmp_path / "notes.mp3").write_bytes(b"\x00")
    (tmp_path / "list.txt").write_text("good_1.wav\n")  # split lists are allowed
    with pytest.raises(DataError, match="notes.mp3"):
        load_wav_folder(tmp_path, 16000)
    (tmp_path / "notes.mp3").unlink()
    with pytest.raises(DataError, match="bad_1.wav: not a readable WAV file"):
        load_wav_folder(tmp_path, 16000)
    with pytest.warns(UserWarning, match="bad_1.wav"):
        names, waves = load_wav_folder(tmp_path, 16000, skip_bad=True)
    assert names == ["good_1.wav"] and len(waves[0]) == 100


def test_speaker_split_is_disjoint_and_list_split():
    names = [f"{spk}_nohash_{i}.wav" for spk in ("aa", "bb", "cc", "dd") for i in range(3)]
    train, held = split_by_speaker(names, 0.25, seed=0)
    spk = lambda idx: {names[i].split("_")[0] for i in idx}  # noqa: E731
    assert len(spk(held)) == 1 and not spk(train) & spk(held) and len(train) + len(held) == 12
    assert split_by_speaker(names, 0.25, seed=0) == (train, held)
    with pytest.raises(DataError, match="no speaker key"):
        split_by_speaker(["nounderscore.wav", "x_1.wav"], 0.5, 0)
    with pytest.raises(DataError, match="at least 2 speakers"):
        split_by_speaker(["a_1.wav", "a_2.wav"], 0.5, 0)


def test_split_by_list(tmp_path):
    names = ["a/x.wav", "a/y.wav", "b/z.wav"]
    (tmp_path / "eval.txt").write_text("a/y.wav\n\n")
    assert split_by_list(names, tmp_path / "eval.txt") == ([0, 2], [1])
    (tmp_path / "bad.txt").write_text("c/w.wav\n")
    with pytest.raises(DataError, match="bad.txt: names files that are not in the data: c/w.wav"):
        split_by_list(names, tmp_path / "bad.txt")


def test_windows_teacher_forcing_padding_and_short_policy():
    clips = [torch.arange(10, 30, dtype=torch.uint8), torch.arange(5, dtype=torch.uint8)]
    data = ClipWindows(clips, 8, "pad", ["long.wav", "short.wav"])
    assert len(data) == 3  # two full windows of the 20-sample clip (tail dropped) + the padded short one
    item = data[1]
    assert item["targets"].tolist() == list(range(18, 26))
    assert item["inputs"].tolist() == [128, *range(18, 25)]
    short = data[2]
    assert short["targets"].tolist() == [0, 1, 2, 3, 4] + [IGNORE] * 3
    assert short["inputs"].tolist() == [128, 0, 1, 2, 3, 4, 128, 128]
    assert len(ClipWindows(clips, 8, "skip")) == 2
    with pytest.raises(DataError, match="short.wav: 5 samples, shorter than the window of 8"):
        ClipWindows(clips, 8, "error", ["long.wav", "short.wav"])
    with pytest.raises(DataError, match="only.wav: no windows"):
        ClipWindows(clips[1:], 8, "skip", ["only.wav"])


def test_embedded_digits_fixture(tmp_path):
    names, codes = load_digits()
    assert codes.dtype == torch.uint8 and codes.shape == (len(names), 16000) and len(names) >= 100
    voices = {n.split("_")[0] for n in names}
    digits = {n.split("_")[1] for n in names}
    assert len(voices) >= 8 and len(digits) == 10
    assert (codes.float() - 128).abs().mean(1).min() > 1  # no silent clips
    np.savez(tmp_path / "bad.npz", codes=np.zeros((2, 3), np.int16), names=np.array(["a", "b"]))
    with pytest.raises(DataError, match="bad.npz: 'codes' must be uint8"):
        load_digits(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="missing"):
        load_digits(tmp_path / "none.npz")
