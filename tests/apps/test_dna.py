"""`ssmkit dna`: pretrain, finetune (scratch / ssmkit run / official checkpoint), eval, embed, predict, demo."""
import json

import h5py
import numpy as np
import pytest
import torch

import ssmkit.apps.cli as cli
from ssmkit.apps.dna import DnaFinetune, application
from ssmkit.apps.runner import Runner
from ssmkit.genomics.hyenadna import HyenaDNALM

SIZE = ["--model-kwargs", "d_model=16,d_inner=32,n_layer=1"]
QUICK = [*SIZE, "--train-size", "32", "--min-len", "48", "--max-len", "48", "--batch-size", "8", "--steps", "2",
         "--warmup-steps", "1", "--log-every", "1", "--eval-size", "16"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "APPLICATIONS", ("ssmkit.apps.dna",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A pretrain run and a fine-tune from it, through the command line."""
    root = tmp_path_factory.mktemp("dna")
    pre, ft = root / "pre", root / "ft"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "APPLICATIONS", ("ssmkit.apps.dna",))
        assert cli.main(["dna", "pretrain", *QUICK, "--out-dir", str(pre), "--seq-len-warmup", "16"]) == 0
        assert cli.main(["dna", "finetune", *QUICK, "--out-dir", str(ft), "--pooling", "last",
                         "--init", str(pre / "model.safetensors")]) == 0
    return root, pre, ft


def test_pretrain_reports_perplexity_and_finetune_starts_from_it(runs):
    root, pre, ft = runs
    record = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in record if r["split"] == "eval"]
    assert evals and 1 < evals[-1]["perplexity"] < 16
    assert json.loads((ft / "run.json").read_text()) == {"classes": ["drosophila", "ecoli", "human", "plasmodium"]}
    last = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"accuracy", "mcc", "f1", "loss"} <= set(last)


def test_embed_and_predict_a_fasta_file(runs, tmp_path, capsys):
    _, _, ft = runs
    fasta = tmp_path / "q.fa"
    fasta.write_text(">a\nACGTACGTTTGA\n>b\nGGGCCCATAT\n")
    out = tmp_path / "e.npy"
    assert cli.main(["dna", "embed", "--out-dir", str(ft), "--input", str(fasta), "--output", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 16) and np.isfinite(emb).all()
    assert cli.main(["dna", "embed", "--out-dir", str(ft), "--input", str(fasta),
                     "--output", str(tmp_path / "e.h5")]) == 0
    with h5py.File(tmp_path / "e.h5") as f:
        assert np.array_equal(f["embeddings"][:], emb) and [n.decode() for n in f["names"][:]] == ["a", "b"]
    assert cli.main(["dna", "embed", "--out-dir", str(ft), "--input", str(fasta),
                     "--output", str(tmp_path / "e.csv")]) == 2
    assert "written as .npy or .h5" in capsys.readouterr().err
    assert cli.main(["dna", "predict", "--out-dir", str(ft), "--input", str(fasta)]) == 0
    lines = (ft / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "record\tclass\tprobability" and lines[1].split("\t")[0] == "a" and len(lines) == 3
    assert lines[1].split("\t")[1] in ("drosophila", "ecoli", "human", "plasmodium")
    # bad input: a non-ACGTN character, then a record longer than l_max
    fasta.write_text(">a\nACGTQ\n")
    assert cli.main(["dna", "predict", "--out-dir", str(ft), "--input", str(fasta)]) == 1
    assert "record 'a': character 'Q' at position 5" in capsys.readouterr().err
    assert cli.main(["dna", "predict", "--out-dir", str(ft), "--input", str(fasta), "--unknown-as-n"]) == 0
    fasta.write_text(">long\n" + "A" * 1100 + "\n")
    assert cli.main(["dna", "embed", "--out-dir", str(ft), "--input", str(fasta)]) == 1
    assert "more than the model's l_max 1026" in capsys.readouterr().err


def test_short_finetune_beats_chance_on_the_species_task(tmp_path):
    cfg = DnaFinetune(out_dir=str(tmp_path), model_kwargs="d_model=16,d_inner=32,n_layer=1", train_size=480,
                      min_len=100, max_len=100, batch_size=16, steps=30, warmup_steps=3, log_every=10, eval_size=64,
                      lr=1e-2)
    cfg.validate()
    result = Runner(application, cfg).train()
    assert result.metrics["accuracy"] > 0.40, result.metrics  # chance: 0.25 (4 balanced species)
    assert result.metrics["mcc"] > 0.15


def test_finetune_from_an_official_checkpoint_and_table_data(tmp_path, capsys):
    torch.manual_seed(0)
    from ssmkit.genomics.hyenadna import HyenaDNAConfig

    lm = HyenaDNALM(HyenaDNAConfig(d_model=16, n_layer=1, d_inner=32))
    state = {"model." + k: v for k, v in lm.state_dict().items()}
    (tmp_path / "official").mkdir()
    torch.save({"state_dict": state}, tmp_path / "official" / "weights.ckpt")
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("sequence,label\n" + "".join(f"{'AT' * 20},a\n{'GC' * 20},b\n" for _ in range(8)))
    test.write_text("sequence,label\n" + f"{'AT' * 20},a\n{'GC' * 20},b\n")
    flags = ["--batch-size", "8", "--steps", "2", "--warmup-steps", "1", "--out-dir", str(tmp_path / "run"),
             "--data", str(train), "--test-data", str(test), "--init", str(tmp_path / "official")]
    assert cli.main(["dna", "finetune", *SIZE, *flags]) == 0
    # eval needs only the run folder (the run's sizes, data and weights)
    assert cli.main(["dna", "eval", "--out-dir", str(tmp_path / "run")]) == 0
    assert f"on 2 sequences of {test}" in capsys.readouterr().out
    # a checkpoint of another size is refused, naming it
    assert cli.main(["dna", "finetune", "--model-kwargs", "d_model=32,d_inner=32,n_layer=1", *flags,
                     "--overwrite"]) == 1
    assert ("official: does not fit hyenadna_tiny_1k (n_classes=2, pooling='mean', d_model=32, d_inner=32, "
            "n_layer=1): shape mismatches") in capsys.readouterr().err
    # classes that differ between train and test
    test.write_text("sequence,label\nACGT,a\nACGT,c\n")
    assert cli.main(["dna", "finetune", *SIZE, *flags, "--overwrite"]) == 1
    assert "the test data have classes ['a', 'c'], the training data ['a', 'b']" in capsys.readouterr().err
    flags = [*SIZE, *flags]
    # sequences longer than the model's l_max, given as data or as window length
    test.write_text("sequence,label\n" + "A" * 1100 + ",a\nGC,b\n")
    assert cli.main(["dna", "finetune", *flags, "--overwrite"]) == 1
    assert "a sequence of 1100 bases is longer than the model's l_max 1026" in capsys.readouterr().err
    assert cli.main(["dna", "finetune", *flags, "--overwrite", "--max-len", "2000"]) == 2
    assert "max_len 2000 does not fit the model's l_max 1026" in capsys.readouterr().err


def test_embed_with_official_weights(tmp_path, capsys):
    """`dna embed --official`: the checkpoint's own sizes, no run folder needed; a bad file is one line naming it."""
    torch.manual_seed(0)
    from ssmkit.genomics.hyenadna import HyenaDNAConfig, pool
    from ssmkit.genomics.tokenizer import CharTokenizer

    lm = HyenaDNALM(HyenaDNAConfig(d_model=16, n_layer=1, d_inner=32, l_max=66)).eval()
    torch.save({"state_dict": {"model." + k: v for k, v in lm.state_dict().items()}}, tmp_path / "weights.ckpt")
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(">a\nACGTACGTAA\n>b\nGGGCCCAT\n")
    out = tmp_path / "emb.npy"
    assert cli.main(["dna", "embed", "--official", str(tmp_path / "weights.ckpt"), "--input", str(fasta),
                     "--output", str(out), "--out-dir", str(tmp_path)]) == 0
    tok = CharTokenizer()
    with torch.no_grad():
        expected = [pool(lm.backbone(tok.encode(seq)[None]), None, "mean")[0].numpy()
                    for seq in ("ACGTACGTAA", "GGGCCCAT")]
    np.testing.assert_allclose(np.load(out), np.stack(expected), rtol=1e-5, atol=1e-6)
    (tmp_path / "broken.ckpt").write_text("not a checkpoint")
    capsys.readouterr()
    assert cli.main(["dna", "embed", "--official", str(tmp_path / "broken.ckpt"), "--input", str(fasta),
                     "--out-dir", str(tmp_path)]) == 1
    assert f"{tmp_path / 'broken.ckpt'}: not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_demo_smoke_section_renders(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--out-dir", str(tmp_path)]) == 0
    assert "dna: species accuracy" in capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert "DNA with HyenaDNA" in md and "uniform baseline perplexity" in md


def test_pretrain_on_a_fasta_file_with_and_without_bed_splits(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    chrom = "".join("ACGT"[i] for i in torch.randint(0, 4, (2000,), generator=g))
    fasta = tmp_path / "genome.fa"
    fasta.write_text(f">chr1\n{chrom}\n>chr2\n{chrom[::-1]}\n")
    flags = [*QUICK, "--data", str(fasta)]
    assert cli.main(["dna", "pretrain", *flags, "--out-dir", str(tmp_path / "a")]) == 0
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t0\t1500\ttrain\nchr2\t0\t1500\ttrain\nchr1\t1500\t2000\ttest\n")
    assert cli.main(["dna", "pretrain", *flags, "--out-dir", str(tmp_path / "b"), "--bed", str(bed),
                     "--train-split", "train"]) == 0
    bed.write_text("chr1\t1500\t2500\ttrain\n")
    assert cli.main(["dna", "pretrain", *flags, "--out-dir", str(tmp_path / "c"), "--bed", str(bed)]) == 1
    assert "interval chr1:1500-2500 lies outside the chromosome (length 2000)" in capsys.readouterr().err
    # IUPAC codes are refused before training, as finetune, embed and predict refuse them (or read as N)
    iupac = tmp_path / "iupac.fa"
    iupac.write_text(f">chr1\n{chrom[:700]}R{chrom[701:]}\n")
    flags = [*QUICK, "--data", str(iupac)]
    assert cli.main(["dna", "pretrain", *flags, "--out-dir", str(tmp_path / "d")]) == 1
    assert "chr1:701 holds 'R', not A, C, G, T or N (pass --unknown-as-n" in capsys.readouterr().err
    assert not (tmp_path / "d" / "metrics.jsonl").exists()
    assert cli.main(["dna", "pretrain", *flags, "--out-dir", str(tmp_path / "d"), "--unknown-as-n"]) == 0


def test_finetune_on_a_labelled_bed_file(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    at = "".join("AT"[i] for i in torch.randint(0, 2, (1200,), generator=g))
    gc = "".join("GC"[i] for i in torch.randint(0, 2, (1200,), generator=g))
    fasta = tmp_path / "g.fa"
    fasta.write_text(f">chrA\n{at}\n>chrG\n{gc}\n")
    bed = tmp_path / "labelled.bed"
    bed.write_text("".join(f"chrA\t{i * 100}\t{i * 100 + 60}\tat_rich\nchrG\t{i * 100}\t{i * 100 + 60}\tgc_rich\n"
                           for i in range(10)))
    flags = [*SIZE, "--data", str(fasta), "--bed", str(bed), "--batch-size", "4", "--steps", "2", "--warmup-steps",
             "1", "--out-dir", str(tmp_path / "run")]
    assert cli.main(["dna", "finetune", *flags]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"classes": ["at_rich", "gc_rich"]}
    assert "4 sequences of " in capsys.readouterr().out  # 20% of each class held out
    bed.write_text("chrA\t0\t60\tat_rich\ttrain\nchrG\t0\t60\tgc_rich\ttest\nchrA\t100\t160\tat_rich\n")
    assert cli.main(["dna", "finetune", *flags, "--overwrite"]) == 1
    assert "some lines have a split column and others do not" in capsys.readouterr().err
    bed.write_text("chrA\t0\t60\n")
    assert cli.main(["dna", "finetune", *flags, "--overwrite"]) == 1
    assert "labelled.bed:1: a labelled BED line needs chrom, start, end and a label" in capsys.readouterr().err


def _final_eval(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def test_demo_finetune_from_the_pretrained_lm_beats_chance(tmp_path):
    """The demo's briefly pretrained LM beats the base composition, and the classifier fine-tuned from that
    backbone beats chance. Pretraining the tiny LM at 6e-3 made it settle on the base composition (a shared
    embedding direction swamping the differences between bases): its pooled features barely differed between
    windows and a classifier fine-tuned from it stayed at chance (25%)."""
    section = application.demo(tmp_path, smoke=False)
    pretrain = _final_eval(tmp_path / "dna-pretrain")
    assert pretrain["perplexity"] < section.metrics["base-composition perplexity"] < 4, (pretrain, section.metrics)
    finetuned = _final_eval(tmp_path / "dna" / "pretrained")
    assert finetuned["accuracy"] > 0.40 and finetuned["mcc"] > 0.2, finetuned  # chance: 0.25, MCC 0
