"""DNA data: FASTA records and FASTA+BED windows (pyfaidx), GenomicBenchmarks folders, CSV/TSV tables, and
the embedded species-of-origin task cut from real genomes (fixtures/species.fa.gz).

Datasets yield (token ids (L,), label) pairs; `collate` pads a batch on the left with [PAD] and returns
(ids, mask, labels). Random windows are drawn from (seed, epoch, index) alone, so a run is reproducible
and every epoch sees fresh windows; `length_at_epoch` gives the sequence-length warm-up of pretraining
(the window length doubles per epoch from `warmup_start` up to the full length, the batch staying fixed).
"""
from __future__ import annotations

import csv
import gzip
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ssmkit.errors import DataError
from ssmkit.genomics.tokenizer import CharTokenizer, reverse_complement

__all__ = ["read_fasta", "read_bed", "bed_lines", "read_bed_line", "read_labelled_bed", "check_same_classes",
           "Region", "fasta_regions", "RandomWindows", "TiledWindows", "LabelledSequences", "read_genomic_benchmarks",
           "read_sequence_table", "species_regions", "SPECIES_FASTA", "collate", "length_at_epoch"]

SPECIES_FASTA = Path(__file__).parent / "fixtures" / "species.fa.gz"
_VALID = frozenset("ACGTNacgtn")


def _check_bases(seq: str, where: str, unknown_as_n: bool) -> str:
    bad = next((i for i, c in enumerate(seq) if c not in _VALID), None)
    if bad is None:
        return seq
    if not unknown_as_n:
        raise DataError(f"{where}: character {seq[bad]!r} at position {bad + 1} is not A, C, G, T or N "
                        f"(pass --unknown-as-n to read such characters as N)")
    return "".join(c if c in _VALID else "N" for c in seq)


def read_fasta(path: str | Path, unknown_as_n: bool = False) -> list[tuple[str, str]]:
    """(name, sequence) records of a FASTA file (plain or gzipped), in file order.

    Raises DataError for a missing or empty file, a record without a header or without bases, and a
    base outside ACGTN (unless `unknown_as_n`, which reads it as N), naming the record and position."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: FASTA file does not exist")
    with path.open("rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    records: list[tuple[str, list[str]]] = []
    with opener(path, "rt") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith(">"):
                records.append((line[1:].strip(), []))
            elif line:
                if not records:
                    raise DataError(f"{path}:{number}: sequence before the first '>' header: not a FASTA file")
                records[-1][1].append(line)
    if not records:
        raise DataError(f"{path}: no FASTA records in this file")
    out = []
    for name, parts in records:
        seq = "".join(parts)
        if not seq:
            raise DataError(f"{path}: record {name!r} is empty")
        out.append((name, _check_bases(seq, f"{path}: record {name!r}", unknown_as_n)))
    return out


@dataclass(frozen=True)
class Region:
    """A stretch of sequence windows are drawn from: `key` names it for `fetch`, [start, end) 0-based."""

    key: str
    start: int
    end: int
    label: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


def bed_lines(path: str | Path):
    """(line number, columns) of every data line of a BED file (tab- or space-separated; comment, track
    and browser lines skipped); a missing file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: BED file does not exist")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith(("#", "track", "browser")):
            yield number, line.split("\t") if "\t" in line else line.split()


def read_bed_line(path: Path, number: int, cols: list[str], lengths: dict[str, int]) -> Region:
    """The interval of one BED line's columns, checked against the chromosome `lengths`."""
    try:
        chrom, start, end = cols[0], int(cols[1]), int(cols[2])
    except (IndexError, ValueError):
        raise DataError(f"{path}:{number}: expected 'chrom start end' with integer coordinates, got "
                        f"{' '.join(cols)!r}") from None
    if chrom not in lengths:
        raise DataError(f"{path}:{number}: chromosome {chrom!r} is not in the FASTA file")
    if not 0 <= start < end <= lengths[chrom]:
        raise DataError(f"{path}:{number}: interval {chrom}:{start}-{end} lies outside the chromosome "
                        f"(length {lengths[chrom]}) or is empty")
    return Region(chrom, start, end)


def read_bed(path: str | Path, lengths: dict[str, int], split: str = "") -> list[Region]:
    """Intervals of a BED file (chrom, start, end[, split or name]; 0-based, half-open) checked against the
    chromosome `lengths`; with `split`, only lines whose 4th column equals it."""
    path, regions = Path(path), []
    for number, cols in bed_lines(path):
        if split and (len(cols) < 4 or cols[3] != split):
            continue
        regions.append(read_bed_line(path, number, cols, lengths))
    if not regions:
        raise DataError(f"{path}: no intervals" + (f" with split {split!r}" if split else ""))
    return regions


_VALID_BYTES = np.frombuffer(b"ACGTNacgtn", dtype=np.uint8)


def _open_fasta(fasta: str | Path):
    import pyfaidx

    fasta = Path(fasta)
    if not fasta.is_file():
        raise DataError(f"{fasta}: FASTA file does not exist")
    try:
        return pyfaidx.Fasta(str(fasta), as_raw=True, sequence_always_upper=False)
    except Exception as e:  # pyfaidx raises several kinds for unreadable or gzip (non-BGZF) files
        raise DataError(f"{fasta}: cannot index this FASTA file with pyfaidx ({type(e).__name__}: {e}); "
                        f"gzipped files must be bgzip-compressed or uncompressed") from None


def _scan_bases(fa, fasta: Path, regions: list[Region], chunk: int = 1 << 24) -> None:
    """DataError naming the first base outside ACGTN (either case) in `regions`, read in chunks."""
    for r in regions:
        for start in range(r.start, r.end, chunk):
            raw = np.frombuffer(fa[r.key][start:min(r.end, start + chunk)].encode("latin-1"), dtype=np.uint8)
            bad = np.flatnonzero(~np.isin(raw, _VALID_BYTES))
            if bad.size:
                at = start + int(bad[0])
                raise DataError(f"{fasta}: {r.key}:{at + 1} holds {chr(raw[bad[0]])!r}, not A, C, G, T or N (pass "
                                f"--unknown-as-n to read such characters as N)")


def fasta_regions(fasta: str | Path, bed: str | Path = "", split: str = "", unknown_as_n: bool = False
                  ) -> tuple[list[Region], Callable[[str, int, int], str]]:
    """(regions, fetch) over an indexed FASTA file read with pyfaidx: the BED intervals, or every whole
    chromosome without a BED file. fetch(chrom, start, end) returns the bases (case as in the file).
    Every base of the regions is checked first: one outside ACGTN is an error naming its position, or,
    with `unknown_as_n`, read as N."""
    fa = _open_fasta(fasta)
    lengths = {name: len(fa[name]) for name in fa.keys()}
    regions = read_bed(bed, lengths, split) if bed else [Region(c, 0, n) for c, n in lengths.items()]
    if unknown_as_n:
        return regions, lambda key, start, end: _check_bases(fa[key][start:end], "", True)
    _scan_bases(fa, Path(fasta), regions)
    return regions, lambda key, start, end: fa[key][start:end]


def read_labelled_bed(fasta: str | Path, bed: str | Path, eval_fraction: float, seed: int,
                      unknown_as_n: bool = False) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, test, classes) of the intervals of a labelled BED file over a FASTA file: columns chrom,
    start, end, label[, split]. With a split column (train / test or val) it decides; without it, a
    stratified `eval_fraction` of each class (drawn with `seed`) is held out. Items are (sequence, class)."""
    fa = _open_fasta(fasta)
    lengths = {name: len(fa[name]) for name in fa.keys()}
    path, rows = Path(bed), []
    for number, cols in bed_lines(path):
        if len(cols) < 4:
            raise DataError(f"{path}:{number}: a labelled BED line needs chrom, start, end and a label; got "
                            f"{' '.join(cols)!r}")
        region = read_bed_line(path, number, cols, lengths)
        split = cols[4] if len(cols) > 4 else ""
        if split not in ("", "train", "test", "val"):
            raise DataError(f"{path}:{number}: split {split!r} is not train, test or val")
        rows.append((region, cols[3], split))
    if not rows:
        raise DataError(f"{path}: no intervals")
    classes = sorted({label for _, label, _ in rows})
    if len(classes) < 2:
        raise DataError(f"{path}: classification needs at least two labels, found {classes}")
    items = [(_check_bases(fa[r.key][r.start:r.end], f"{path}: {r.key}:{r.start}-{r.end}", unknown_as_n),
              classes.index(label), split) for r, label, split in rows]
    if any(split for *_, split in items):
        if not all(split for *_, split in items):
            raise DataError(f"{path}: some lines have a split column and others do not")
        train = [(s, y) for s, y, split in items if split == "train"]
        test = [(s, y) for s, y, split in items if split != "train"]
    else:
        g = torch.Generator().manual_seed(seed)
        train, test = [], []
        for label in range(len(classes)):
            mine = [(s, y) for s, y, _ in items if y == label]
            order = torch.randperm(len(mine), generator=g).tolist()
            n_test = max(1, round(eval_fraction * len(mine)))
            test += [mine[i] for i in order[:n_test]]
            train += [mine[i] for i in order[n_test:]]
    if not train or not test:
        raise DataError(f"{path}: the split leaves {len(train)} training and {len(test)} test intervals")
    return train, test, classes


def check_same_classes(classes: list[str], test_classes: list[str], where) -> None:
    """DataError when the test data's classes differ from the training data's."""
    if test_classes != classes:
        raise DataError(f"{where}: the test data have classes {test_classes}, the training data {classes}")


def species_regions(split: str) -> tuple[list[Region], list[str], Callable[[str, int, int], str]]:
    """(regions, class names, fetch) of the embedded species task's `split` ("train" or "test"): every
    record of fixtures/species.fa.gz (`species|split|source` headers) is one region, labelled by species;
    `fetch` reads any record of either split."""
    records = [(name.split("|"), seq) for name, seq in read_fasta(SPECIES_FASTA)]
    classes = sorted({parts[0] for parts, _ in records})
    by_key = {str(index): seq for index, (_, seq) in enumerate(records)}
    regions = [Region(str(index), 0, len(seq), classes.index(parts[0]))
               for index, (parts, seq) in enumerate(records) if parts[1] == split]
    if not regions:
        raise DataError(f"{SPECIES_FASTA}: no records of split {split!r}")
    return regions, classes, lambda key, start, end: by_key[key][start:end]


def length_at_epoch(epoch: int, max_len: int, warmup_start: int) -> int:
    """Sequence-length warm-up: warmup_start * 2**epoch, capped at max_len (0 = no warm-up)."""
    return max_len if warmup_start <= 0 else min(max_len, warmup_start * 2 ** epoch)


class RandomWindows(Dataset):
    """`size` windows per epoch drawn from `regions`, a region chosen with probability proportional to its
    length, the window length uniform in [min_len, max_len] (or given by the warm-up schedule), its start
    uniform. Windows more than `max_n` N are redrawn (up to 10 times). With `rc_prob`, a window is reverse-
    complemented with that probability. Item: (ids (len,), label of the region)."""

    def __init__(self, regions: list[Region], fetch: Callable[[str, int, int], str], size: int, min_len: int,
                 max_len: int, tokenizer: CharTokenizer, seed: int, rc_prob: float = 0.0, max_n: float = 0.5,
                 warmup_start: int = 0, add_eos: bool = False):
        if min_len < 1 or max_len < min_len:
            raise DataError(f"window lengths must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}")
        short = [r for r in regions if r.length < min_len]
        if short:
            raise DataError(f"{len(short)} region(s) are shorter than the window length {min_len}, e.g. "
                            f"{short[0].key}:{short[0].start}-{short[0].end}")
        self.regions, self.fetch, self.size = regions, fetch, size
        self.min_len, self.max_len, self.tokenizer, self.seed = min_len, max_len, tokenizer, seed
        self.rc_prob, self.max_n, self.warmup_start, self.add_eos = rc_prob, max_n, warmup_start, add_eos
        self.weights = [r.length for r in regions]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the windows of `epoch` (the runner calls this before each training epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        top = length_at_epoch(self.epoch, self.max_len, self.warmup_start)
        for _ in range(10):
            region = rng.choices(self.regions, self.weights)[0]
            length = min(rng.randint(min(self.min_len, top), top), region.length)
            start = region.start + rng.randrange(region.length - length + 1)
            seq = self.fetch(region.key, start, start + length)
            if seq.upper().count("N") <= self.max_n * length:
                break
        if rng.random() < self.rc_prob:
            seq = reverse_complement(seq)
        return self.tokenizer.encode(seq, add_eos=self.add_eos), region.label


class TiledWindows(Dataset):
    """Non-overlapping windows of `length` bases tiling each region from its start (a fixed eval set)."""

    def __init__(self, regions: list[Region], fetch: Callable[[str, int, int], str], length: int,
                 tokenizer: CharTokenizer, add_eos: bool = False):
        self.items = [(r, s) for r in regions for s in range(r.start, r.end - length + 1, length)]
        if not self.items:
            raise DataError(f"no region is as long as the window length {length}")
        self.fetch, self.length, self.tokenizer, self.add_eos = fetch, length, tokenizer, add_eos

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        region, start = self.items[index]
        return self.tokenizer.encode(self.fetch(region.key, start, start + self.length), add_eos=self.add_eos), region.label


class LabelledSequences(Dataset):
    """Given (sequence, label) pairs, tokenized on access; `rc_prob` reverse-complements at random per epoch."""

    def __init__(self, items: list[tuple[str, int]], tokenizer: CharTokenizer, rc_prob: float = 0.0, seed: int = 0):
        self.items, self.tokenizer, self.rc_prob, self.seed, self.epoch = items, tokenizer, rc_prob, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        seq, label = self.items[index]
        if self.rc_prob and random.Random(hash((self.seed, self.epoch, index))).random() < self.rc_prob:
            seq = reverse_complement(seq)
        return self.tokenizer.encode(seq), label


def read_genomic_benchmarks(root: str | Path, split: str, unknown_as_n: bool = False
                            ) -> tuple[list[tuple[str, int]], list[str]]:
    """(items, classes) of a GenomicBenchmarks dataset folder: `root/<split>/<class>/*.txt`, one sequence
    per file; classes are the sorted sub-folder names."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (GenomicBenchmarks layout: <root>/train/<class>/*.txt and "
                        f"<root>/test/<class>/*.txt)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders")
    items = []
    for label, name in enumerate(classes):
        files = sorted((folder / name).glob("*.txt"))
        if not files:
            raise DataError(f"{folder / name}: empty class folder (no .txt sequence files)")
        for f in files:
            seq = f.read_text().strip()
            if not seq:
                raise DataError(f"{f}: empty sequence file")
            items.append((_check_bases(seq, str(f), unknown_as_n), label))
    return items, classes


def read_sequence_table(path: str | Path, sequence_column: str = "sequence", label_column: str = "label",
                        unknown_as_n: bool = False) -> tuple[list[tuple[str, str]], list[str]]:
    """(items of (sequence, label text), sorted label names) of a CSV (.csv) or TSV (.tsv/.txt) file with a
    header row naming the sequence and label columns (the Nucleotide Transformer tasks' layout)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: table file does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="," if path.suffix == ".csv" else "\t")
        missing = [c for c in (sequence_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(reader.fieldnames or [])})")
        items = []
        for number, row in enumerate(reader, 2):
            seq, label = (row[sequence_column] or "").strip(), (row[label_column] or "").strip()
            if not seq or not label:
                raise DataError(f"{path}:{number}: missing {'sequence' if not seq else 'label'}")
            items.append((_check_bases(seq, f"{path}:{number}", unknown_as_n), label))
    if not items:
        raise DataError(f"{path}: no rows")
    return items, sorted({label for _, label in items})


def collate(samples: list[tuple[torch.Tensor, int]], tokenizer: CharTokenizer | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T), labels (B,)) of (ids, label) samples, padded on the tokenizer's side."""
    ids, mask = (tokenizer or CharTokenizer()).pad([s[0] for s in samples])
    return ids, mask, torch.tensor([s[1] for s in samples], dtype=torch.long)
