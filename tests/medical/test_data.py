"""CLAM bags, slide tables, patient-grouped splits with the leakage check, and the clear errors."""
import csv

import numpy as np
import pytest
import torch

from ssmkit.errors import DataError
from ssmkit.medical.data import (BagDataset, Case, SplitLeakageError, check_leakage, make_splits,
                                 make_synthetic_bags, read_bag, read_bag_attrs, read_cases, read_splits, write_bag,
                                 write_splits)
from ssmkit.medical.survival import survival_bins


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_bag_files_round_trip(tmp_path):
    feats, coords = torch.randn(5, 7), torch.tensor([[0, 0], [256, 0], [512, 0], [0, 256], [256, 256]])
    h5, pt = write_bag(tmp_path, "slide_a", feats, coords, {"patch_size": 256, "patch_level": 0})
    f, c = read_bag(h5)
    assert torch.equal(f, feats) and torch.equal(c, coords)
    assert read_bag_attrs(h5)["patch_size"] == 256
    f, c = read_bag(pt)
    assert torch.equal(f, feats) and c is None


def test_bad_bags_are_named(tmp_path):
    with pytest.raises(DataError, match="nope.h5"):
        read_bag(tmp_path / "nope.h5")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="broken.h5 is not a readable HDF5"):
        read_bag(tmp_path / "broken.h5")
    torch.save(torch.zeros(0, 4), tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt is an empty bag"):
        read_bag(tmp_path / "empty.pt")


def test_read_cases_groups_slides_and_checks_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["case_id", "slide_id", "label"],
                     [["p1", "s1", "LUAD"], ["p2", "s2", "LUSC"], ["p1", "s3", "LUAD"]])
    cases = read_cases(path)
    assert [(c.case_id, c.slide_ids, c.label) for c in cases] == [("p1", ["s1", "s3"], "LUAD"), ("p2", ["s2"], "LUSC")]
    bad = write_csv(tmp_path / "b.csv", ["case_id", "slide_id", "label"], [["p1", "s1", "A"], ["p1", "s2", "B"]])
    with pytest.raises(ValueError, match="b.csv:3: patient p1 has slides labelled"):
        read_cases(bad)
    with pytest.raises(ValueError, match="lacks column"):
        read_cases(path, task="survival")


def test_dataset_errors_name_the_problem(tmp_path):
    write_bag(tmp_path, "s1", torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long))
    cases = [Case("p1", ["s1"], "A"), Case("p2", ["s2"], "B")]
    with pytest.raises(DataError, match="slide s2 is listed in the CSV but has no bag"):
        BagDataset(tmp_path, cases, labels={"A": 0, "B": 1})
    with pytest.raises(ValueError, match="label 'A', not one of"):
        BagDataset(tmp_path, cases[:1], labels={"B": 0})
    with pytest.raises(DataError, match=r"s1.h5: feature width 8, not --in-dim 1024"):  # before any epoch
        BagDataset(tmp_path, cases[:1], labels={"A": 0}, in_dim=1024)
    assert BagDataset(tmp_path, cases[:1], labels={"A": 0}).in_dim == 8


def test_survival_patient_bags_concatenate_slides(tmp_path):
    csv_path = make_synthetic_bags(tmp_path, n_cases=8, dim=4, min_instances=5, max_instances=6, seed=3)
    cases = read_cases(csv_path, "survival")
    edges = survival_bins([c.time for c in cases], [c.censorship for c in cases])
    ds = BagDataset(tmp_path, cases, "survival", bin_edges=edges)
    two = next(i for i, c in enumerate(cases) if len(c.slide_ids) == 2)
    parts = [read_bag(tmp_path / "h5_files" / f"{s}.h5")[0] for s in cases[two].slide_ids]
    item = ds[two]
    assert torch.equal(item["features"], torch.cat(parts))
    assert 0 <= item["bin"] < 4 and item["censorship"] in (0.0, 1.0)


def cohort(n=30, multi=(0, 3, 7)):
    cases = []
    for i in range(n):
        slides = [f"{i:03d}_a"] + ([f"{i:03d}_b"] if i in multi else [])
        cases.append(Case(f"case{i:03d}", slides, "pos" if i % 3 == 0 else "neg"))
    return cases


@pytest.mark.parametrize("mode", ["kfold", "montecarlo"])
def test_generated_splits_are_grouped_by_patient(mode):
    cases = cohort()
    splits = make_splits(cases, k=5, mode=mode, seed=1)
    assert len(splits) == 5
    for split in splits:
        assert check_leakage(split, cases) == []
        assert set(split["train"]) | set(split["val"]) | set(split["test"]) == {s for c in cases for s in c.slide_ids}
    if mode == "kfold":  # disjoint val folds covering everybody, each holding both classes
        vals = [set(s["val"]) for s in splits]
        assert sum(len(v) for v in vals) == len(set().union(*vals)) == 33
        label = {s: c.label for c in cases for s in c.slide_ids}
        assert all({label[s] for s in v} == {"pos", "neg"} for v in vals)


def test_leakage_is_refused_or_warned():
    cases = cohort()
    leaky = {"train": ["000_a", "001_a"], "val": ["000_b"], "test": []}  # patient case000 on both sides
    with pytest.raises(SplitLeakageError, match="case000"):
        check_leakage(leaky, cases)
    with pytest.warns(UserWarning, match="LEAKAGE"):
        assert check_leakage(leaky, cases, strict=False) == ["case000"]


def test_split_files_round_trip_keep_string_ids(tmp_path):
    split = {"train": ["007", "010", "011"], "val": ["012"], "test": []}
    path = write_splits(tmp_path, [split])[0]
    assert path.name == "splits_0.csv"
    assert read_splits(path) == split
    np.testing.assert_equal(read_splits(path)["train"][0], "007")
