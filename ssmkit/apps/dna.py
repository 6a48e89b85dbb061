"""`ssmkit dna`: HyenaDNA pretraining, fine-tuning, embeddings and predictions on DNA.

    ssmkit dna pretrain                                # next-token LM on the embedded genomes (perplexity)
    ssmkit dna pretrain --data genome.fa --bed regions.bed --seq-len-warmup 64
    ssmkit dna finetune                                # species of origin on the embedded genomes
    ssmkit dna finetune --init runs/dna-pretrain/model.safetensors
    ssmkit dna finetune --init path/to/hyenadna-tiny-1k-seqlen --model hyenadna_tiny_1k  # official weights
    ssmkit dna finetune --data path/to/human_nontata_promoters          # GenomicBenchmarks folder
    ssmkit dna finetune --data train.csv --test-data test.csv           # sequence,label tables (NT tasks)
    ssmkit dna finetune --data genome.fa --bed labelled.bed             # BED intervals with a label column
    ssmkit dna eval --out-dir runs/dna                 # a fine-tuned run on its test data
    ssmkit dna embed --input seqs.fa --output emb.npy  # pooled features of every record
    ssmkit dna predict --input seqs.fa                 # class of every record (fine-tuned run)

Embedded data (`--data species`): real DNA of four species (human chrX, P. falciparum, E. coli,
Drosophila) cut from Debian packages into ssmkit/genomics/fixtures/species.fa.gz. Training windows
come from 5 regions per species, eval windows from a sixth region that no training window touches.
Fine-tuning reports accuracy, MCC and macro-F1 (chance: 1 / classes); pretraining reports the
next-token perplexity (a model that knows nothing about DNA: 4, the uniform 4-letter baseline).

`--model` names a registered HyenaDNA configuration (default: the published tiny-1k, 436,096 parameters);
`--model-kwargs` changes its sizes (d_model=..., n_layer=..., d_inner=..., l_max=...). `--init` loads
weights from an ssmkit run (safetensors) or an official checkpoint (Lightning weights.ckpt or -hf
model.safetensors), which must fit the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, build_registered, load_run
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, WeightsOptions, compose, option, parse_kwargs)
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.run_folder import RunFolder, atomic_write
from ssmkit.apps.runner import Runner, train_and_eval
from ssmkit.errors import DataError
from ssmkit.genomics import data as gdata
from ssmkit.genomics.hyenadna import pool
from ssmkit.genomics.metrics import classification_metrics, composition_perplexity
from ssmkit.genomics.tokenizer import BASE_IDS, CharTokenizer
from ssmkit.registry import load_official

__all__ = ["DnaModel", "DnaReading", "Windows", "FinetuneData", "PretrainData", "DnaFinetune", "DnaPretrain",
           "DnaEmbed", "DnaApp", "PretrainApp", "application"]


@dataclass
class DnaModel(ModelOptions):
    """The HyenaDNA configuration and its starting weights."""

    init: str = option("", "initial weights: an ssmkit .safetensors or an official HyenaDNA checkpoint path")
    modulation_shift: float = option(-1.0, "constant added to the filter decay (-1: 0.05 for -hf checkpoints, "
                                           "else 0.0, as the code each was published with)")


@dataclass
class Pooling:
    """How a classifier pools the sequence."""

    title = "head"
    pooling: str = option("mean", "sequence features for the head: mean over tokens (paper), last token (official "
                                  "HF head) or first token", ("mean", "last", "first"))


@dataclass
class DnaReading:
    """How sequences are read into tokens."""

    title = "reading"
    unknown_as_n: bool = option(False, "read characters other than ACGTN (IUPAC codes, ...) as N instead of failing")
    lowercase: str = option("upper", "lowercase (soft-masked) bases: read as bases, or as [UNK] like the official "
                                     "tokenizer", ("upper", "unk"))


@dataclass
class Windows:
    """The windows training draws and evaluation tiles."""

    title = "windows"
    rc_aug: float = option(0.5, "probability of reverse-complementing a training sequence")
    min_len: int = option(200, "shortest training window in bases")
    max_len: int = option(500, "longest training window in bases (eval windows have this length)")
    train_size: int = option(2048, "windows drawn per training epoch")
    eval_size: int = option(400, "eval windows (at most; spread evenly over the held-out sequence)")

    def check(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(f"need 1 <= min_len <= max_len, got {self.min_len} and {self.max_len}")
        if not 0 <= self.rc_aug <= 1:
            raise ConfigError(f"rc_aug is a probability, got {self.rc_aug}")
        if self.train_size < 1 or self.eval_size < 1:
            raise ConfigError(f"train_size and eval_size must be at least 1, got {self.train_size}, {self.eval_size}")


@dataclass
class FinetuneData:
    """The labelled sequences of fine-tuning."""

    title = "data"
    data: str = option("species", "species (embedded genomes), a GenomicBenchmarks folder (train/ + test/), a "
                                  ".csv/.tsv file of sequence,label rows, or a FASTA file with a labelled --bed")
    test_data: str = option("", "the test .csv/.tsv file when --data is a table")
    bed: str = option("", "with a FASTA --data: BED intervals with a label (4th column) and optionally a split "
                          "(5th column, train/test; without it --eval-fraction of each class is held out)")
    eval_fraction: float = option(0.2, "share of each class held out when the data have no test split")
    sequence_column: str = option("sequence", "sequence column of --data tables")
    label_column: str = option("label", "label column of --data tables")

    def check(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")


@dataclass
class PretrainData:
    """The sequences of next-token pretraining."""

    title = "data"
    data: str = option("species", "species (the embedded genomes) or a FASTA file (uncompressed or bgzip)")
    bed: str = option("", "BED intervals of --data to draw windows from (chrom start end [split])")
    train_split: str = option("", "use BED lines whose 4th column is this (empty: all; else eval uses --eval-split)")
    eval_split: str = option("test", "BED 4th-column value of the eval intervals (with --train-split)")
    eval_fraction: float = option(0.1, "without BED splits: the last fraction of every sequence is held out")
    seq_len_warmup: int = option(0, "sequence-length warm-up: start at this many bases, double every epoch (0: off)")

    def check(self) -> None:
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")


@dataclass
class EmbedOptions:
    """The sequences to embed or classify and where the result goes."""

    title = "input"
    input: str = option("", "FASTA file of sequences (each at most the model's l_max bases)")
    output: str = option("", "output file (empty: embeddings.npy for embed, predictions.tsv for predict, in the run "
                             "folder); embed writes .npy, or .h5 with the record names beside")
    official: str = option("", "embed with an official HyenaDNA checkpoint instead of a run (its sizes come from "
                               "the file)")

    def check(self) -> None:
        if not self.input:
            raise ConfigError("--input (a FASTA file) is required")


_DNA_TRAINING = dict(steps=150, batch_size=16, lr=1e-3, warmup_steps=10, weight_decay=0.1, eval_every=50,
                     eval_batch_size=32, log_every=25)
DnaFinetune = compose("DnaFinetune", RunOptions, SeedOptions, FinetuneData, DnaReading, Windows, DnaModel, Pooling,
                      TrainOptions, EvalOptions, DeviceOptions,
                      defaults=dict(model="hyenadna_tiny_1k", **_DNA_TRAINING),
                      doc="`ssmkit dna finetune`: HyenaDNA fine-tuning for sequence classification.")
# pretraining keeps lr 1e-3 (HyenaDNA's recipe: 6e-4 at batch 64-256): from 2e-3 up, small models on the
# embedded genomes often spike (the implicit filters' gradients) and settle on the base composition alone
DnaPretrain = compose("DnaPretrain", RunOptions, SeedOptions, PretrainData, DnaReading, Windows, DnaModel,
                      TrainOptions, EvalOptions, DeviceOptions, defaults=dict(
                          model="hyenadna_tiny_1k", min_len=256, max_len=256, eval_size=128, rc_aug=0.0,
                          **_DNA_TRAINING),
                      doc="`ssmkit dna pretrain`: HyenaDNA next-token pretraining.")
DnaEmbed = compose("DnaEmbed", RunOptions, WeightsOptions, DnaReading, EmbedOptions,
                   doc="`ssmkit dna embed` / `predict`: a trained run (or official weights) on a FASTA file.")


def _build(ctx: RunContext, n_classes: int, pooling: str = "mean") -> nn.Module:
    """The configured HyenaDNA (LM or classifier), holding the weights of `--init` when given (official or
    ssmkit; a classifier head of another size starts fresh, and the shift defaults to the checkpoint's)."""
    cfg = ctx.cfg
    if not cfg.init:
        return build_registered(cfg, n_classes=n_classes, pooling=pooling,
                                modulation_shift=max(cfg.modulation_shift, 0.0))
    shift = {} if cfg.modulation_shift < 0 else {"modulation_shift": cfg.modulation_shift}
    return build_registered(cfg, official_weights=cfg.init, n_classes=n_classes, pooling=pooling, **shift)


def _l_max(cfg) -> int:
    """The longest input of the configured model (its preset's, or --model-kwargs' l_max)."""
    from ssmkit.genomics.hyenadna import PRESETS

    if cfg.model not in PRESETS:
        raise ConfigError(f"--model {cfg.model!r} is not a HyenaDNA configuration; choose from {', '.join(PRESETS)}")
    return int(parse_kwargs(cfg.model_kwargs, "model_kwargs").get("l_max", PRESETS[cfg.model][3]))


def _check_fits(cfg, max_len: int) -> None:
    if max_len + 1 > _l_max(cfg):  # + 1: pretraining windows end with [SEP]
        raise ConfigError(f"max_len {max_len} does not fit the model's l_max {_l_max(cfg)} (with the end token); "
                          f"raise l_max in --model-kwargs or lower --max-len")


def _evenly(dataset, n: int):
    """At most `n` items of `dataset`, evenly spaced (a smaller fixed eval set over all of it)."""
    step = max(1, math.ceil(len(dataset) / n))
    return torch.utils.data.Subset(dataset, range(0, len(dataset), step))


def classification_data(cfg, tok: CharTokenizer):
    """(train set, eval set, class names, eval description) of --data (and --test-data / --bed)."""
    if cfg.data == "species":
        train_regions, classes, fetch = gdata.species_regions("train")
        test_regions, _, _ = gdata.species_regions("test")
        train = gdata.RandomWindows(train_regions, fetch, cfg.train_size, cfg.min_len, cfg.max_len, tok, cfg.seed,
                                    rc_prob=cfg.rc_aug)
        test = _evenly(gdata.TiledWindows(test_regions, fetch, cfg.max_len, tok), cfg.eval_size)
        return train, test, classes, f"{len(test)} windows of {cfg.max_len} bp from the held-out region of each species"
    path = Path(cfg.data)
    if cfg.bed:
        train, test, classes = gdata.read_labelled_bed(path, cfg.bed, cfg.eval_fraction, cfg.seed, cfg.unknown_as_n)
        source = f"{cfg.bed} over {path}"
    elif path.is_dir():
        train, classes = gdata.read_genomic_benchmarks(path, "train", cfg.unknown_as_n)
        test, test_classes = gdata.read_genomic_benchmarks(path, "test", cfg.unknown_as_n)
        gdata.check_same_classes(classes, test_classes, path)
        source = f"{path}/test"
    elif path.suffix in (".csv", ".tsv", ".txt"):
        if not cfg.test_data:
            raise ConfigError(f"--data {path} is a table: give the test table with --test-data")
        kw = dict(sequence_column=cfg.sequence_column, label_column=cfg.label_column, unknown_as_n=cfg.unknown_as_n)
        rows, classes = gdata.read_sequence_table(path, **kw)
        test_rows, test_classes = gdata.read_sequence_table(cfg.test_data, **kw)
        gdata.check_same_classes(classes, test_classes, cfg.test_data)
        train = [(s, classes.index(label)) for s, label in rows]
        test = [(s, classes.index(label)) for s, label in test_rows]
        source = cfg.test_data
    else:
        raise ConfigError(f"--data {cfg.data}: not 'species', a GenomicBenchmarks folder, a .csv/.tsv file, or a "
                          f"FASTA file with --bed")
    longest = max(len(seq) for seq, _ in train + test)
    if longest > _l_max(cfg):
        raise DataError(f"--data {cfg.data}: a sequence of {longest} bases is longer than the model's l_max "
                        f"{_l_max(cfg)}; raise l_max in --model-kwargs (the implicit filters depend on it) or crop "
                        f"the data")
    return (gdata.LabelledSequences(train, tok, cfg.rc_aug, cfg.seed), gdata.LabelledSequences(test, tok), classes,
            f"{len(test)} sequences of {source}")


class DnaApp(Application):
    """Fine-tune HyenaDNA for sequence classification; also the `ssmkit dna` command group."""

    name = "dna"
    help = "HyenaDNA on DNA: pretrain (next token), finetune (classification), eval, embed, predict"
    train_config = DnaFinetune
    data_groups = (FinetuneData, DnaReading)
    metrics = {"accuracy": "max", "mcc": "max", "f1": "max", "loss": "min"}
    meta_must_match = ("classes",)

    def setup(self, cfg) -> RunSpec:
        _check_fits(cfg, cfg.max_len)
        train, test, classes, described = classification_data(cfg, CharTokenizer(lowercase=cfg.lowercase))
        return RunSpec(train, test, {"classes": list(classes)}, described)

    def build_model(self, ctx: RunContext) -> nn.Module:
        return _build(ctx, len(ctx.meta["classes"]), ctx.cfg.pooling)

    def collate(self, samples):
        return gdata.collate(samples)

    def train_loss(self, model, batch, ctx: RunContext) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(model(ids, mask).float(), labels)

    def eval_step(self, model, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        ids, mask, labels = batch
        logits = model(ids, mask).float()
        return {"pred": logits.argmax(-1), "label": labels, "loss": F.cross_entropy(logits, labels, reduction="none")}

    def compute_metrics(self, outputs, ctx: RunContext):
        return {**classification_metrics(outputs["pred"].numpy(), outputs["label"].numpy()),
                "loss": outputs["loss"].double().mean().item()}

    def commands(self) -> list[Command]:
        pretrain = PretrainApp()
        return [
            Command("pretrain", "next-token pretraining on FASTA(+BED) windows or the embedded genomes (perplexity)",
                    DnaPretrain, lambda cfg: Runner(pretrain, cfg).train()),
            *train_and_eval(self, "finetune", "train a classifier (from scratch, an ssmkit run or official weights: "
                                              "--init); accuracy, MCC, F1"),
            Command("embed", "pooled features of every FASTA record to .npy or .h5", DnaEmbed, embed),
            Command("predict", "class of every FASTA record from a fine-tuned run (TSV)", DnaEmbed, predict),
        ]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        return _demo(self, out_dir, smoke)


class PretrainApp(Application):
    """Next-token pretraining of the HyenaDNA LM; eval reports perplexity on held-out windows."""

    name = "dna-pretrain"
    help = "HyenaDNA next-token pretraining"
    train_config = DnaPretrain
    data_groups = (PretrainData, DnaReading)
    metrics = {"perplexity": "min", "loss": "min"}

    def setup(self, cfg) -> RunSpec:
        _check_fits(cfg, cfg.max_len)
        tok = CharTokenizer(lowercase=cfg.lowercase)
        if cfg.data == "species":
            train_regions, _, fetch = gdata.species_regions("train")
            eval_regions, _, _ = gdata.species_regions("test")
        elif cfg.train_split:
            train_regions, fetch = gdata.fasta_regions(cfg.data, cfg.bed, cfg.train_split, cfg.unknown_as_n)
            eval_regions, _ = gdata.fasta_regions(cfg.data, cfg.bed, cfg.eval_split, cfg.unknown_as_n)
        else:
            regions, fetch = gdata.fasta_regions(cfg.data, cfg.bed, unknown_as_n=cfg.unknown_as_n)
            cut = [r.end - int(r.length * cfg.eval_fraction) for r in regions]
            train_regions = [gdata.Region(r.key, r.start, c) for r, c in zip(regions, cut)]
            eval_regions = [gdata.Region(r.key, c, r.end) for r, c in zip(regions, cut)]
        train = gdata.RandomWindows(train_regions, fetch, cfg.train_size, cfg.min_len, cfg.max_len, tok, cfg.seed,
                                    rc_prob=cfg.rc_aug, warmup_start=cfg.seq_len_warmup, add_eos=True)
        evals = _evenly(gdata.TiledWindows(eval_regions, fetch, cfg.max_len, tok, add_eos=True), cfg.eval_size)
        return RunSpec(train, evals, {}, f"{len(evals)} held-out windows of {cfg.max_len} bp of {cfg.data}")

    def build_model(self, ctx: RunContext) -> nn.Module:
        return _build(ctx, 0)

    def collate(self, samples):
        return gdata.collate(samples)

    def train_loss(self, model, batch, ctx: RunContext) -> torch.Tensor:
        return model.loss(batch[0])

    def eval_step(self, model, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        ids, mask, _ = batch
        logits = model(ids[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        valid = mask[:, :-1] & (ids[:, 1:] >= BASE_IDS)  # per base: the [SEP] and [PAD] targets do not count
        return {"nll": (nll * valid).sum(1), "tokens": valid.sum(1)}

    def compute_metrics(self, outputs, ctx: RunContext):
        loss = outputs["nll"].double().sum().item() / max(1, outputs["tokens"].sum().item())
        return {"perplexity": math.exp(loss), "loss": loss}


application = DnaApp()


# ----------------------------------------------------------------------------------------------
# embed and predict


def _model_and_reading(cfg, app: Application) -> tuple[nn.Module, CharTokenizer, RunFolder, list[str] | None]:
    """The model of the run in --out-dir (or of --official), its tokenizer, the folder outputs go to, and
    its classes (None for an LM or official weights)."""
    folder = RunFolder.of(cfg, app.name)
    if cfg.official:
        model = load_official("hyenadna", cfg.official)
        return model.eval(), CharTokenizer(lowercase=cfg.lowercase), folder, None
    run = load_run(app, cfg)
    return run.model, CharTokenizer(lowercase=run.cfg.lowercase), run.folder, run.meta.get("classes")


def _records(cfg, l_max: int, unknown_as_n: bool) -> list[tuple[str, str]]:
    records = gdata.read_fasta(cfg.input, unknown_as_n)
    for name, seq in records:
        if len(seq) > l_max:
            raise DataError(f"{cfg.input}: record {name!r} has {len(seq)} bases, more than the model's l_max "
                                  f"{l_max}; split it or use a longer-context model")
    return records


def embed(cfg) -> Path:
    """Write the pooled features of every record of --input to a .npy or .h5 file (one record at a time,
    so only one sequence's activations are in memory)."""
    output = Path(cfg.output) if cfg.output else None
    if output is not None and output.suffix not in (".npy", ".h5"):
        raise ConfigError(f"--output {output}: the embeddings are written as .npy or .h5, not {output.suffix!r}")
    model, tok, folder, _ = _model_and_reading(cfg, application)
    output = output or folder / "embeddings.npy"
    pooling = getattr(model, "pooling", "mean")
    names, rows = [], []
    with torch.no_grad():
        for name, seq in _records(cfg, model.config.l_max, cfg.unknown_as_n):
            names.append(name)
            rows.append(pool(model.backbone(tok.encode(seq)[None]), None, pooling)[0].float().numpy())

    def write(tmp: Path) -> None:
        if output.suffix == ".h5":
            import h5py

            with h5py.File(tmp, "w") as f:
                f.create_dataset("embeddings", data=np.stack(rows))
                f.create_dataset("names", data=np.array(names, dtype=h5py.string_dtype()))
                f.attrs["pooling"] = pooling
        else:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
                np.save(f, np.stack(rows))

    atomic_write(output, write)
    print(f"dna embed: {len(rows)} records x {rows[0].shape[0]} features ({pooling} pooling) -> {output}")
    return output


def predict(cfg) -> list[dict]:
    """Predict the class of every record of --input with a fine-tuned run; writes a TSV and returns rows."""
    if cfg.official:
        raise ConfigError("predict needs a fine-tuned run (--out-dir), not --official weights")
    model, tok, folder, classes = _model_and_reading(cfg, application)
    rows = []
    with torch.no_grad():
        for name, seq in _records(cfg, model.config.l_max, cfg.unknown_as_n):
            prob = model(tok.encode(seq)[None]).float().softmax(-1)[0]
            rows.append({"record": name, "class": classes[int(prob.argmax())], "probability": float(prob.max())})
    output = Path(cfg.output) if cfg.output else folder / "predictions.tsv"
    text = "record\tclass\tprobability\n" + "".join(f"{r['record']}\t{r['class']}\t{r['probability']:.4f}\n"
                                                    for r in rows)
    atomic_write(output, lambda tmp: tmp.write_text(text))
    for r in rows[:20]:
        print(f"{r['record']}\t{r['class']}\t{r['probability']:.3f}")
    print(f"dna predict: {len(rows)} records -> {output}")
    return rows


# ----------------------------------------------------------------------------------------------
# demo


def _demo(app: DnaApp, out_dir: Path, smoke: bool) -> ReportSection:
    sizes = dict(model_kwargs="d_model=16,d_inner=32,n_layer=1", train_size=64, min_len=64, max_len=64, batch_size=8,
                 steps=3, warmup_steps=1, eval_every=0, log_every=3, eval_size=24) if smoke else \
        dict(model_kwargs="d_model=32,d_inner=64,n_layer=2", train_size=1024, min_len=200, max_len=200, batch_size=16,
             warmup_steps=5, eval_every=0, log_every=20, eval_size=160)
    # pretraining: windows from 50 bases doubling per epoch of 64 steps (sequence-length warm-up) to 200
    pre_cfg = DnaPretrain(out_dir=str(out_dir / "dna-pretrain"), overwrite=True,
                          **{**sizes, **(dict(steps=2) if smoke else dict(steps=300, warmup_steps=10,
                                                                          seq_len_warmup=50, log_every=50))})
    pre_cfg.validate()
    pre_app = PretrainApp()
    pre = Runner(pre_app, pre_cfg).train()
    pre_spec = pre_app.setup(pre_cfg)
    composition = composition_perplexity(pre_spec.train, pre_spec.eval)
    runs = {}
    for start, folder, init in (("from scratch", "scratch", ""),
                                ("from the pretrained LM", "pretrained", str(pre.out_dir / "model.safetensors"))):
        cfg = DnaFinetune(out_dir=str(out_dir / app.name / folder), overwrite=True, init=init,
                          **{**sizes, "steps": 3 if smoke else 60})
        cfg.validate()
        runs[start] = Runner(app, cfg).train()
    classes = runs["from scratch"].meta["classes"]
    model = runs["from scratch"].model
    n_params = sum(p.numel() for p in model.parameters())
    chance = 1 / len(classes)
    ppl = pre.metrics["perplexity"]
    mc = model.config
    text = (
        f"A {mc.n_layer}-layer HyenaDNA (`hyenadna_tiny_1k` sized down to d_model {mc.d_model}, MLP "
        f"{mc.d_inner}; {n_params:,} parameters with the {len(classes)}-class head; the published tiny-1k "
        f"has 436,096) on real DNA shipped in Debian packages: human chrX, P. falciparum, E. coli 536 and "
        f"Drosophila upstream regions (`ssmkit/genomics/fixtures/species.fa.gz`).\n\n"
        f"The LM is pretrained for {pre.step} steps of {pre_cfg.batch_size} windows on next-token prediction over "
        f"the training regions, the windows growing from {pre_cfg.seq_len_warmup or pre_cfg.max_len} to "
        f"{pre_cfg.max_len} bp (sequence-length warm-up). Its perplexity per base on held-out windows is "
        f"{ppl:.3f}, against 4 for a model that knows nothing (uniform over A, C, G, T) and {composition:.3f} for "
        f"one that knows only the base composition of the training regions. A classifier is then fine-tuned "
        f"for {runs['from scratch'].step} steps to tell the species of a {cfg.max_len}-bp window (mean pooling, "
        f"reverse-complement augmentation), from the pretrained backbone and, for comparison, from scratch; "
        f"chance accuracy is 1/{len(classes)}. Eval windows come from a held-out region of each species "
        f"that no training window overlaps. Run folders: `{pre.out_dir}`, `{out_dir / app.name}`."
    )
    m, scratch = runs["from the pretrained LM"].metrics, runs["from scratch"].metrics
    metrics = {"species accuracy (fine-tuned from the pretrained LM)": f"{m['accuracy']:.1%}",
               "species accuracy (from scratch)": f"{scratch['accuracy']:.1%}", "chance accuracy": f"{chance:.1%}",
               "species MCC (from the pretrained LM)": m["mcc"], "species macro-F1 (from the pretrained LM)": m["f1"],
               "held-out perplexity per base": ppl, "base-composition perplexity": composition,
               "uniform baseline perplexity": 4.0,
               "training time (s)": round(pre.wall_s + sum(r.wall_s for r in runs.values()), 1)}
    print(f"dna: species accuracy {m['accuracy']:.3f} fine-tuned from the pretrained LM ({scratch['accuracy']:.3f} "
          f"from scratch; chance {chance:.3f}); perplexity {ppl:.3f} vs {composition:.3f} base composition, 4 uniform")
    rows = [[start, f"{r.metrics['accuracy']:.3f}", f"{r.metrics['mcc']:.3f}", f"{r.metrics['f1']:.3f}",
             f"{r.metrics['loss']:.3f}"] for start, r in runs.items()]
    table = Table(f"Species of origin on held-out regions ({len(classes)} classes)",
                  ["fine-tuned", "accuracy", "MCC", "macro-F1", "loss"], rows)
    return ReportSection("DNA with HyenaDNA (ssmkit dna)", text, metrics,
                         images=[*pre.plots, *runs["from the pretrained LM"].plots], tables=[table])
