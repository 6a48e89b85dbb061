"""DNA data readers and datasets: FASTA, FASTA+BED (pyfaidx), benchmark folders, tables, the species task."""
import gzip

import pytest
import torch

from ssmkit.errors import DataError
from ssmkit.genomics import data as gd
from ssmkit.genomics.tokenizer import CharTokenizer

TOK = CharTokenizer()


def write(path, text):
    path.write_text(text)
    return path


def test_read_fasta_plain_and_gzip(tmp_path):
    text = ">r1 desc\nACGT\nNNac\n>r2\nGG\n"
    assert gd.read_fasta(write(tmp_path / "a.fa", text)) == [("r1 desc", "ACGTNNac"), ("r2", "GG")]
    with gzip.open(tmp_path / "a.fa.gz", "wt") as f:
        f.write(text)
    assert gd.read_fasta(tmp_path / "a.fa.gz")[1] == ("r2", "GG")


def test_read_fasta_errors_name_record_and_position(tmp_path):
    bad = write(tmp_path / "bad.fa", ">ok\nACGT\n>chr2\nACGRT\n")
    with pytest.raises(DataError, match=r"bad.fa: record 'chr2': character 'R' at position 4"):
        gd.read_fasta(bad)
    assert gd.read_fasta(bad, unknown_as_n=True)[1] == ("chr2", "ACGNT")
    with pytest.raises(DataError, match="record 'e' is empty"):
        gd.read_fasta(write(tmp_path / "empty.fa", ">e\n>f\nAC\n"))
    with pytest.raises(DataError, match="sequence before the first '>' header"):
        gd.read_fasta(write(tmp_path / "nohead.fa", "ACGT\n"))
    with pytest.raises(DataError, match="does not exist"):
        gd.read_fasta(tmp_path / "missing.fa")


@pytest.fixture
def genome(tmp_path):
    g = torch.Generator().manual_seed(0)
    chr1 = "".join("ACGT"[i] for i in torch.randint(0, 4, (300,), generator=g))
    chr2 = "N" * 100 + "acgt" * 25
    path = write(tmp_path / "g.fa", f">chr1\n{chr1[:150]}\n{chr1[150:]}\n>chr2\n{chr2}\n")
    return path, chr1, chr2


def test_fasta_bed_regions_are_zero_based_half_open(tmp_path, genome):
    path, chr1, _ = genome
    bed = write(tmp_path / "r.bed", "chr1\t10\t20\ttrain\nchr1\t100\t200\ttest\nchr2\t100\t200\ttrain\n")
    regions, fetch = gd.fasta_regions(path, bed, split="train")
    assert [(r.key, r.start, r.end) for r in regions] == [("chr1", 10, 20), ("chr2", 100, 200)]
    assert fetch("chr1", 10, 20) == chr1[10:20]
    whole, _ = gd.fasta_regions(path)
    assert [(r.key, r.length) for r in whole] == [("chr1", 300), ("chr2", 200)]


def test_bed_errors(tmp_path, genome):
    path, _, _ = genome
    with pytest.raises(DataError, match=r"r.bed:1: interval chr1:250-400 lies outside the chromosome \(length 300\)"):
        gd.fasta_regions(path, write(tmp_path / "r.bed", "chr1\t250\t400\n"))
    with pytest.raises(DataError, match="chromosome 'chr9' is not in the FASTA file"):
        gd.fasta_regions(path, write(tmp_path / "r.bed", "chr9\t0\t10\n"))
    with pytest.raises(DataError, match="integer coordinates"):
        gd.fasta_regions(path, write(tmp_path / "r.bed", "chr1\tten\t20\n"))


def test_random_windows_are_reproducible_skip_n_runs_and_augment(genome):
    path, chr1, chr2 = genome
    regions, fetch = gd.fasta_regions(path)
    ds = gd.RandomWindows(regions, fetch, 50, 20, 40, TOK, seed=1, max_n=0.0)
    items = [ds[i] for i in range(50)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(items, [ds[i] for i in range(50)]))
    assert all(20 <= len(ids) <= 40 and 11 not in ids.tolist() for ids, _ in items)  # N-runs redrawn
    ds.set_epoch(1)
    assert any(not torch.equal(items[i][0], ds[i][0]) for i in range(50))
    fwd = gd.RandomWindows(regions[:1], fetch, 40, 30, 30, TOK, seed=2)
    rc = gd.RandomWindows(regions[:1], fetch, 40, 30, 30, TOK, seed=2, rc_prob=1.0)
    text = [TOK.decode(fwd[i][0]) for i in range(40)]
    assert all(t in chr1 for t in text)
    assert [TOK.decode(rc[i][0]) for i in range(40)] == [t[::-1].translate(str.maketrans("ACGT", "TGCA")) for t in text]


def test_sequence_length_warmup_doubles_per_epoch(genome):
    path, _, _ = genome
    regions, fetch = gd.fasta_regions(path)
    ds = gd.RandomWindows(regions, fetch, 8, 64, 256, TOK, seed=0, warmup_start=64)
    lengths = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        lengths.append(max(len(ds[i][0]) for i in range(8)))
    assert lengths[0] == 64 and lengths[1] <= 128 and lengths[3] <= 256
    assert [gd.length_at_epoch(e, 256, 64) for e in range(4)] == [64, 128, 256, 256]


def test_genomic_benchmarks_folder(tmp_path):
    for split, seqs in (("train", {"negative": ["ACGT", "GGCC"], "positive": ["TTTT"]}),
                        ("test", {"negative": ["AC"], "positive": ["TT"]})):
        for cls, items in seqs.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i, s in enumerate(items):
                write(tmp_path / split / cls / f"{i}.txt", s + "\n")
    items, classes = gd.read_genomic_benchmarks(tmp_path, "train")
    assert classes == ["negative", "positive"] and items == [("ACGT", 0), ("GGCC", 0), ("TTTT", 1)]
    (tmp_path / "test" / "other").mkdir()
    with pytest.raises(DataError, match="other: empty class folder"):
        gd.read_genomic_benchmarks(tmp_path, "test")
    with pytest.raises(DataError, match="no such folder"):
        gd.read_genomic_benchmarks(tmp_path, "valid")


def test_sequence_tables(tmp_path):
    items, classes = gd.read_sequence_table(write(tmp_path / "t.csv", "sequence,label\nACGT,1\nGG,0\n"))
    assert items == [("ACGT", "1"), ("GG", "0")] and classes == ["0", "1"]
    items, _ = gd.read_sequence_table(write(tmp_path / "t.tsv", "seq\tclass\nAC\tx\n"), "seq", "class")
    assert items == [("AC", "x")]
    with pytest.raises(DataError, match="t.csv:3: missing label"):
        gd.read_sequence_table(write(tmp_path / "t.csv", "sequence,label\nACGT,1\nGG,\n"))
    with pytest.raises(DataError, match="no column 'label'"):
        gd.read_sequence_table(write(tmp_path / "t.csv", "sequence,y\nACGT,1\n"))


def test_species_task_splits_by_region_without_overlap():
    train, classes, fetch = gd.species_regions("train")
    test, test_classes, _ = gd.species_regions("test")
    assert classes == test_classes == ["drosophila", "ecoli", "human", "plasmodium"]
    assert {r.key for r in train}.isdisjoint(r.key for r in test)
    heads = {name: seq for name, seq in gd.read_fasta(gd.SPECIES_FASTA)}
    sources = {n.rsplit("|", 1)[1].split(" #")[0] for n in heads if "|test|" in n}
    assert not any(n.rsplit("|", 1)[1].split(" #")[0] in sources for n in heads if "|train|" in n)
    assert {r.label for r in test} == {0, 1, 2, 3}
    eval_set = gd.TiledWindows(test, fetch, 500, TOK)
    assert len(eval_set) == 4 * 80 and set(eval_set[0][0].tolist()) <= {7, 8, 9, 10}
    ids, mask, labels = gd.collate([eval_set[0], (torch.tensor([7, 8]), 3)])
    assert ids.shape == (2, 500) and mask[1].sum() == 2 and ids[1, 0] == 4 and labels.tolist() == [eval_set[0][1], 3]
