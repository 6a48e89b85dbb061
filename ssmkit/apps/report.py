"""What runs write for people: the metric log, the curve plots and the demo report.

- `MetricLog`: every logged record to `metrics.jsonl`, plus `train_log.csv` and `eval_log.csv`.
- `plot_curves`: PNGs of the loss and of every eval metric against the step (matplotlib, no display).
- `ReportSection` + `write_report`: the `ssmkit demo` page, `index.html` and `report.md`, with
  images, audio players and tables referenced by relative path, so the folder renders offline.

A domain's `Application.demo` returns one `ReportSection`:

    ReportSection(title="Selective copy", text="what was trained, on what",
                  metrics={"accuracy": 0.99}, images=[run.plots...], audio=[wav paths],
                  tables=[Table("Samples", ["input", "target", "output"], rows)])
"""
from __future__ import annotations

import csv
import html
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MetricLog", "plot_curves", "Table", "ReportSection", "write_report"]

_TRAIN_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s")


# ----------------------------------------------------------------------------------------------
# Metric log and curves


class MetricLog:
    """Append-only log of a run's records: dicts with "split" ("train" or "eval"), "step" and values.

    Opening a log keeps only the records up to `keep_until` of the files already in `out_dir` (those
    a resumed run saw before its checkpoint; later ones are the lost part of a killed run) and
    rewrites the files with them.
    """

    def __init__(self, out_dir: Path, keep_until: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        old = []
        if self.jsonl.exists():
            old = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        self.records: list[dict[str, Any]] = []
        for path in (self.jsonl, self._csv("train"), self._csv("eval")):
            path.unlink(missing_ok=True)
        for record in old:
            if record["step"] <= keep_until:
                self.append(record)

    def _csv(self, split: str) -> Path:
        return self.out_dir / f"{split}_log.csv"

    def append(self, record: dict[str, Any]) -> None:
        """Add one record to memory, metrics.jsonl and the split's CSV (flushed at once)."""
        self.records.append(record)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self._csv(record["split"])
        new = not path.exists()
        if record["split"] == "train":
            columns = list(_TRAIN_COLUMNS)
        elif new:
            columns = [k for k in record if k != "split"]
        else:
            with open(path, newline="") as f:
                columns = next(csv.reader(f))
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)


def plot_curves(records: list[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """Write `loss.png` (train loss, and eval loss when there is one) and `<metric>.png` for every
    other eval metric, each against the optimizer step; returns the paths."""
    from matplotlib.figure import Figure  # the object API needs no display and no global backend
    from matplotlib.ticker import FuncFormatter, NullFormatter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    curves: dict[str, list[tuple[str, list[dict[str, Any]]]]] = {}
    if train:
        curves["loss"] = [("train", train)]
    for key in dict.fromkeys(k for r in evals for k in r if k not in ("split", "step")):
        curves.setdefault(key, []).append(("eval", evals))
    paths = []
    for name, series in curves.items():
        fig = Figure(figsize=(5, 3.2), dpi=100, layout="constrained")
        ax = fig.subplots()
        for label, rows in series:
            points = [(r["step"], r[name]) for r in rows if name in r and math.isfinite(r[name])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        values = [r[name] for _, rows in series for r in rows if name in r and math.isfinite(r[name])]
        if name == "loss" and values and min(values) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            # between the powers of ten, label 2x and 5x when the curve spans less than two decades
            ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label) if max(values) / min(values) < 100
                                         else NullFormatter())
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{title} {name}".strip())
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        path = out_dir / f"{_safe_name(name)}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def _minor_label(value: float, _pos) -> str:
    return f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ----------------------------------------------------------------------------------------------
# Demo report


@dataclass
class Table:
    """A small table: column names and rows of values (shown as text)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class ReportSection:
    """One application's part of the demo report. Paths may lie anywhere: files outside the report
    folder are copied into it. `status` is "ok" or an error message when the demo failed."""

    title: str
    text: str = ""  # paragraphs separated by blank lines; `code` spans in backticks
    metrics: dict[str, Any] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    audio: list[Path] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    wall_s: float | None = None
    status: str = "ok"


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root`, copying it under root/media/ when it lies elsewhere."""
    path, root = Path(path).resolve(), root.resolve()
    if not path.is_relative_to(root):
        target = root / "media" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        path = target
    return path.relative_to(root).as_posix()


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _inline_html(text: str) -> str:
    """Escape `text`, turning `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.meta{color:#666} .failed{color:#b00020;font-weight:600}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f6} td.mono,code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
.images{display:flex;flex-wrap:wrap;gap:1em} .images figure{margin:0}
.images img{max-width:500px;border:1px solid #eee} figcaption{color:#666;font-size:.85em}
"""


def write_report(sections: list[ReportSection], out_dir: Path, title: str, intro: str = "") -> tuple[Path, Path]:
    """Write `index.html` and `report.md` for `sections` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{html.escape(title)}</h1>"]
    md = [f"# {title}", ""]
    if intro:
        body.append(f"<p class=meta>{_inline_html(intro)}</p>")
        md += [intro, ""]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        if s.status != "ok":
            body.append(f"<p class=failed>Demo failed: {html.escape(s.status)}</p>")
            md += [f"**Demo failed:** {s.status}", ""]
        if s.wall_s is not None:
            body.append(f"<p class=meta>wall time {s.wall_s:.1f} s</p>")
            md += [f"_wall time {s.wall_s:.1f} s_", ""]
        for para in (p.strip() for p in s.text.split("\n\n")):
            if para:
                body.append(f"<p>{_inline_html(para)}</p>")
                md += [para, ""]
        if s.metrics:
            body.append("<table><tr><th>metric</th><th>value</th></tr>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(_value(v))}</td></tr>" for k, v in s.metrics.items())
                + "</table>")
            md += ["| metric | value |", "| --- | --- |", *(f"| {k} | {_value(v)} |" for k, v in s.metrics.items()), ""]
        if s.images:
            figures = []
            for path in s.images:
                rel = _relative(path, out_dir)
                figures.append(f'<figure><img src="{html.escape(rel)}" alt="{html.escape(Path(rel).stem)}">'
                               f"<figcaption>{html.escape(Path(rel).name)}</figcaption></figure>")
                md += [f"![{Path(rel).stem}]({rel})", ""]
            body.append(f"<div class=images>{''.join(figures)}</div>")
        for path in s.audio:
            rel = _relative(path, out_dir)
            body.append(f'<p>{html.escape(Path(rel).name)}<br><audio controls preload="none" '
                        f'src="{html.escape(rel)}"></audio></p>')
            md += [f"- audio: [{Path(rel).name}]({rel})", ""]
        for t in s.tables:
            body.append(f"<h3>{html.escape(t.title)}</h3><table><tr>"
                        + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td class=mono>{html.escape(_value(v))}</td>" for v in row)
                                  + "</tr>" for row in t.rows) + "</table>")
            md += [f"### {t.title}", "", "| " + " | ".join(c.replace("|", "\\|") for c in t.columns) + " |",
                   "| " + " | ".join("---" for _ in t.columns) + " |",
                   *("| " + " | ".join(_value(v).replace("|", "\\|") for v in row) + " |" for row in t.rows), ""]
    page = (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_CSS}</style></head>"
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")
    html_path, md_path = out_dir / "index.html", out_dir / "report.md"
    html_path.write_text(page)
    md_path.write_text("\n".join(md).rstrip() + "\n")
    return html_path, md_path
