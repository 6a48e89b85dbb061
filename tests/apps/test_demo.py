"""`ssmkit demo --smoke` end to end, and the report writer."""
import re
import wave

import pytest

from ssmkit.apps.cli import main
from ssmkit.apps.report import ReportSection, Table, write_report


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def local_references(page: str) -> list[str]:
    """Every src/href of an HTML page; fails on anything that would need a network."""
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert not re.search(r"https?://|//[a-z]", page.replace("<!doctype html>", "")), "remote reference"
    return refs


def test_demo_smoke_writes_a_self_contained_report(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"selective copy: token accuracy \d\.\d{4}", out)
    page = (tmp_path / "index.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "Selective copy with Mamba" in page and "Selective copy with Mamba" in md
    refs = local_references(page)
    assert {"seq/plots/loss.png", "seq/plots/accuracy.png"} <= set(refs)
    assert all((tmp_path / ref).is_file() for ref in refs)
    assert "token accuracy" in md and "| context | target | model output | all correct |" in md
    assert (tmp_path / "seq" / "model.safetensors").exists()
    # a second demo in the same folder replaces the first
    assert main(["demo", "--smoke", "--out-dir", str(tmp_path), "--only", "seq"]) == 0
    assert main(["demo", "--smoke", "--out-dir", str(tmp_path), "--only", "nope"]) == 2


def test_report_sections_with_images_audio_tables_and_failures(tmp_path):
    media = tmp_path / "elsewhere"
    media.mkdir()
    image = media / "curve.png"
    image.write_bytes(b"\x89PNG fake")
    sound = media / "tone.wav"
    with wave.open(str(sound), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 80)
    sections = [
        ReportSection("Audio <demo>", "First paragraph with `code`.\n\nSecond one.", {"psnr": 31.234567, "n": 3},
                      images=[image], audio=[sound], tables=[Table("Rows", ["a", "b|c"], [[1, "x<y"], [2.5, "z"]])],
                      wall_s=1.5),
        ReportSection("Broken", status="RuntimeError: boom"),
    ]
    html_path, md_path = write_report(sections, tmp_path / "report", "Title", intro="Intro")
    page, md = html_path.read_text(), md_path.read_text()
    assert sorted(local_references(page)) == ["media/curve.png", "media/tone.wav"]
    assert (tmp_path / "report/media/tone.wav").read_bytes() == sound.read_bytes()
    assert "<h2>Audio &lt;demo&gt;</h2>" in page and "<code>code</code>" in page and "x&lt;y" in page
    assert '<audio controls preload="none" src="media/tone.wav">' in page
    assert "Demo failed: RuntimeError: boom" in page and "**Demo failed:** RuntimeError: boom" in md
    assert "| psnr | 31.23 |" in md and "![curve](media/curve.png)" in md and "| a | b\\|c |" in md
