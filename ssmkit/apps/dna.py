"""`ssmkit dna`: HyenaDNA pretraining, fine-tuning, embeddings and predictions on DNA.

    ssmkit dna pretrain                                # next-token LM on the embedded genomes (perplexity)
    ssmkit dna pretrain --data genome.fa --bed regions.bed --seq-len-warmup 64
    ssmkit dna finetune                                # species of origin on the embedded genomes
    ssmkit dna finetune --init runs/dna-pretrain/model.safetensors
    ssmkit dna finetune --init path/to/hyenadna-tiny-1k-seqlen --model hyenadna_tiny_1k  # official weights
    ssmkit dna finetune --data path/to/human_nontata_promoters          # GenomicBenchmarks folder
    ssmkit dna finetune --data train.csv --test-data test.csv           # sequence,label tables (NT tasks)
    ssmkit dna embed --input seqs.fa --output emb.npy  # pooled features of every record
    ssmkit dna predict --input seqs.fa                 # class of every record (fine-tuned run)

Embedded data (`--data species`): real DNA of four species (human chrX, P. falciparum, E. coli,
Drosophila) cut from Debian packages into ssmkit/genomics/fixtures/species.fa.gz. Training windows
come from 5 regions per species, eval windows from a sixth region that no training window touches.
Fine-tuning reports accuracy, MCC and macro-F1 (chance: 1 / classes); pretraining reports the
next-token perplexity (a model that knows nothing about DNA: 4, the uniform 4-letter baseline).

Model sizes: `--model` names a registered HyenaDNA configuration (default: the published tiny-1k, 436,096
parameters); `--d-model --n-layer --d-inner --l-max` override it (0 keeps the preset's). `--init` loads weights from an ssmkit run
(safetensors) or an official checkpoint (Lightning weights.ckpt or -hf model.safetensors); the model
options must then describe that checkpoint's size.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.apps.config import ConfigError, TrainConfig, option
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Application, Command, Runner, RunError, atomic_write, eval_config, load_weights
from ssmkit.genomics import data as gdata
from ssmkit.genomics.checkpoints import DEFAULT_SHIFT, CheckpointError, load_hyenadna, read_state_dict
from ssmkit.genomics.hyenadna import PRESETS, HyenaDNAConfig, build_hyenadna, pool
from ssmkit.genomics.tokenizer import BASE_IDS, VOCAB_SIZE, CharTokenizer

__all__ = ["ModelOptions", "DnaConfig", "PretrainConfig", "EmbedConfig", "PredictConfig", "DnaApp", "PretrainApp", "application"]

# options of a run's config.toml that embed and predict take over (the model it trained)
_MODEL_FIELDS = ("model", "d_model", "n_layer", "d_inner", "l_max", "modulation_shift", "pooling", "lowercase")


@dataclass
class ModelOptions(TrainConfig):
    """What pretraining and fine-tuning share: model size, initial weights, windows of the data, training
    defaults (sized for a few CPU minutes)."""

    model: str = option("hyenadna_tiny_1k", "registered HyenaDNA configuration", tuple(PRESETS))
    d_model: int = option(0, "model width (0: the preset's, 128 for tiny-1k)")
    n_layer: int = option(0, "Hyena blocks (0: the preset's)")
    d_inner: int = option(0, "MLP width (0: the preset's)")
    l_max: int = option(0, "longest input in tokens; the implicit filters depend on it (0: the preset's)")
    modulation_shift: float = option(-1.0, "constant added to the filter decay (-1: 0.05 for -hf checkpoints, "
                                           "else 0.0, as the code each was published with)")
    init: str = option("", "initial weights: an ssmkit .safetensors or an official HyenaDNA checkpoint path")
    unknown_as_n: bool = option(False, "read characters other than ACGTN as N instead of failing")
    lowercase: str = option("upper", "lowercase (soft-masked) bases: read as bases, or as [UNK] like the "
                                     "official tokenizer", ("upper", "unk"))
    rc_aug: float = option(0.5, "probability of reverse-complementing a training sequence")
    min_len: int = option(200, "shortest training window in bases")
    max_len: int = option(500, "longest training window in bases (eval windows have this length)")
    train_size: int = option(2048, "windows drawn per training epoch")
    eval_size: int = option(400, "eval windows (at most; spread evenly over the held-out sequence)")
    steps: int = option(150, "optimizer steps to train for")
    batch_size: int = option(16, "samples per optimizer step, summed over all processes and accumulation steps")
    lr: float = option(1e-3, "peak learning rate of AdamW")
    warmup_steps: int = option(10, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = option(0.1, "AdamW weight decay (never on norms, biases or the Hyena filters)")
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = option(32, "samples per eval forward pass and process (0: the training micro-batch)")
    log_every: int = option(25, "print and log the training metrics every N steps")

    @property
    def model_l_max(self) -> int:
        """The longest input of the configured model."""
        return self.l_max or PRESETS[self.model][3]

    def validate(self) -> None:
        super().validate()
        for name in ("d_model", "n_layer", "d_inner", "l_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(f"need 1 <= min_len <= max_len, got {self.min_len} and {self.max_len}")
        if not 0 <= self.rc_aug <= 1:
            raise ConfigError(f"rc_aug is a probability, got {self.rc_aug}")
        if self.max_len + 1 > self.model_l_max:  # + 1: pretraining windows end with [SEP]
            raise ConfigError(f"max_len {self.max_len} does not fit the model's l_max {self.model_l_max} "
                              f"(with the end token); raise --l-max or lower --max-len")
        if self.train_size < 1 or self.eval_size < 1:
            raise ConfigError(f"train_size and eval_size must be at least 1, got {self.train_size}, {self.eval_size}")


@dataclass
class DnaConfig(ModelOptions):
    """HyenaDNA fine-tuning for sequence classification."""

    data: str = option("species", "species (embedded genomes), a GenomicBenchmarks folder (train/ + test/), "
                                  "or a .csv/.tsv file of sequence,label rows")
    test_data: str = option("", "the test .csv/.tsv file when --data is a table")
    sequence_column: str = option("sequence", "sequence column of --data tables")
    label_column: str = option("label", "label column of --data tables")
    pooling: str = option("mean", "sequence features for the head: mean over tokens (paper), last token "
                                  "(official HF head) or first token", ("mean", "last", "first"))


@dataclass
class PretrainConfig(ModelOptions):
    """HyenaDNA next-token pretraining on FASTA (+BED) windows or the embedded genomes.

    The learning rate stays at 1e-3 (HyenaDNA's recipe: 6e-4 at batch 64-256): from 2e-3 up, small models
    on the embedded genomes often spike (the implicit filters' gradients) and settle on the base composition
    alone, with pooled features that no longer differ between windows, and a classifier fine-tuned from such
    a backbone stays at chance."""

    data: str = option("species", "species (the embedded genomes) or a FASTA file (uncompressed or bgzip)")
    bed: str = option("", "BED intervals of --data to draw windows from (chrom start end [split])")
    train_split: str = option("", "use BED lines whose 4th column is this (empty: all; else eval uses --eval-split)")
    eval_split: str = option("test", "BED 4th-column value of the eval intervals (with --train-split)")
    eval_fraction: float = option(0.1, "without BED splits: the last fraction of every sequence is held out")
    seq_len_warmup: int = option(0, "sequence-length warm-up: start at this many bases, double every epoch (0: off)")
    eval_size: int = option(128, "eval windows (at most; spread evenly over the held-out sequence)")
    min_len: int = option(256, "shortest training window in bases")
    max_len: int = option(256, "longest training window in bases (eval windows have this length)")
    rc_aug: float = option(0.0, "probability of reverse-complementing a training window")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")


@dataclass
class EmbedConfig(DnaConfig):
    """`ssmkit dna embed`: features of every record of a FASTA file."""

    input: str = option("", "FASTA file of sequences to embed (each at most l_max bases)")
    output: str = option("", "output file, records x d_model: .npy, or .h5 with the record names beside "
                             "(datasets `embeddings`, `names`) (empty: out_dir/embeddings.npy)")
    weights: str = option("", "weights to use (empty: the --init checkpoint when given, else "
                              "out_dir/best.safetensors, else out_dir/model.safetensors)")

    def validate(self) -> None:
        super().validate()
        if not self.input:
            raise ConfigError("--input (a FASTA file) is required")


@dataclass
class PredictConfig(EmbedConfig):
    """`ssmkit dna predict`: the class of every record of a FASTA file, from a fine-tuned run."""

    output: str = option("", "output .tsv file (empty: out_dir/predictions.tsv)")


def model_config(cfg: ModelOptions) -> HyenaDNAConfig:
    """The HyenaDNAConfig of the preset `cfg.model` with the size options and the modulation shift."""
    d_model, n_layer, d_inner, l_max = PRESETS[cfg.model]
    shift = cfg.modulation_shift
    if shift < 0:
        shift = DEFAULT_SHIFT[_layout(cfg.init)] if cfg.init else 0.0
    return HyenaDNAConfig(d_model=cfg.d_model or d_model, n_layer=cfg.n_layer or n_layer,
                          d_inner=cfg.d_inner or d_inner, l_max=cfg.l_max or l_max, modulation_shift=shift)


def _layout(path: str) -> str:
    try:
        return read_state_dict(path)[1]
    except CheckpointError as e:
        raise RunError(f"--init: {e}") from None


def _initialise(model: nn.Module, cfg: ModelOptions) -> nn.Module:
    """Load the backbone from `cfg.init` (ssmkit run or official checkpoint) into `model`."""
    if not cfg.init:
        return model
    try:
        source, _ = load_hyenadna(cfg.init, config=model.config)
    except CheckpointError as e:
        raise RunError(f"--init: {e}") from None
    model.backbone.load_state_dict(source.backbone.state_dict())
    return model


def _tokenizer(cfg: ModelOptions) -> CharTokenizer:
    return CharTokenizer(lowercase=cfg.lowercase)


def _data_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except gdata.DataError as e:
        raise RunError(str(e)) from None


def _evenly(dataset, n: int):
    """At most `n` items of `dataset`, evenly spaced (a smaller fixed eval set over all of it)."""
    step = max(1, math.ceil(len(dataset) / n))
    return torch.utils.data.Subset(dataset, range(0, len(dataset), step))


def classification_data(cfg: DnaConfig):
    """(train set, eval set, class names) of --data (and --test-data)."""
    tok = _tokenizer(cfg)
    if cfg.data == "species":
        train_regions, classes, fetch = gdata.species_regions("train")
        test_regions, _, _ = gdata.species_regions("test")
        train = gdata.RandomWindows(train_regions, fetch, cfg.train_size, cfg.min_len, cfg.max_len, tok, cfg.seed,
                                    rc_prob=cfg.rc_aug)
        return train, _evenly(gdata.TiledWindows(test_regions, fetch, cfg.max_len, tok), cfg.eval_size), classes
    path = Path(cfg.data)
    if path.is_dir():
        train, classes = _data_error(gdata.read_genomic_benchmarks, path, "train", cfg.unknown_as_n)
        test, test_classes = _data_error(gdata.read_genomic_benchmarks, path, "test", cfg.unknown_as_n)
    elif path.suffix in (".csv", ".tsv", ".txt"):
        if not cfg.test_data:
            raise RunError(f"--data {path} is a table: give the test table with --test-data")
        kw = dict(sequence_column=cfg.sequence_column, label_column=cfg.label_column, unknown_as_n=cfg.unknown_as_n)
        rows, classes = _data_error(gdata.read_sequence_table, path, **kw)
        test_rows, test_classes = _data_error(gdata.read_sequence_table, cfg.test_data, **kw)
        if test_classes == classes:
            train = [(s, classes.index(label)) for s, label in rows]
            test = [(s, classes.index(label)) for s, label in test_rows]
    else:
        raise RunError(f"--data {cfg.data}: not 'species', a GenomicBenchmarks folder or a .csv/.tsv file")
    if test_classes != classes:
        raise RunError(f"the classes of the train and test data differ: train has {classes}, test has {test_classes}")
    longest = max(len(seq) for seq, _ in train + test)
    if longest > cfg.model_l_max:
        raise RunError(f"--data {cfg.data}: a sequence of {longest} bases is longer than the model's l_max "
                       f"{cfg.model_l_max}; raise --l-max (the implicit filters depend on it) or crop the data")
    return (gdata.LabelledSequences(train, tok, cfg.rc_aug, cfg.seed), gdata.LabelledSequences(test, tok), classes)


class DnaApp(Application):
    """Fine-tune HyenaDNA for sequence classification; also the `ssmkit dna` command group."""

    name = "dna"
    help = "HyenaDNA on DNA: pretrain (next token), finetune (classification), embed, predict"
    config = DnaConfig
    metrics = {"accuracy": "max", "mcc": "max", "f1": "max", "loss": "min"}

    def build_datasets(self, cfg: DnaConfig):
        train, test, self.classes = classification_data(cfg)
        return train, test

    def build_model(self, cfg: DnaConfig) -> nn.Module:  # the runner builds the datasets (and classes) first
        return _initialise(build_hyenadna(model_config(cfg), len(self.classes), cfg.pooling), cfg)

    def collate(self, samples):
        return gdata.collate(samples)

    def train_loss(self, model, batch) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(model(ids, mask).float(), labels)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        ids, mask, labels = batch
        logits = model(ids, mask).float()
        return {"pred": logits.argmax(-1), "label": labels,
                "loss": F.cross_entropy(logits, labels, reduction="none")}

    def compute_metrics(self, outputs):
        from sklearn.metrics import f1_score, matthews_corrcoef

        y, p = outputs["label"].numpy(), outputs["pred"].numpy()
        return {"accuracy": float((y == p).mean()), "mcc": float(matthews_corrcoef(y, p)),
                "f1": float(f1_score(y, p, average="macro")), "loss": outputs["loss"].double().mean().item()}

    def finetune(self, cfg: DnaConfig):
        runner = Runner(self, cfg)
        result = runner.train()
        if runner.main:
            atomic_write(result.out_dir / "classes.json", lambda tmp: tmp.write_text(json.dumps(self.classes)))
        return result

    def commands(self) -> list[Command]:
        pretrain = PretrainApp()
        return [
            Command("pretrain", "next-token pretraining on FASTA(+BED) windows or the embedded genomes (perplexity)",
                    PretrainConfig, lambda cfg: Runner(pretrain, cfg).train()),
            Command("finetune", "train a classifier (from scratch, an ssmkit run or official weights: --init); "
                                "accuracy, MCC, F1", DnaConfig, self.finetune),
            Command("eval", "evaluate a fine-tuned run on its test data", eval_config(DnaConfig),
                    lambda cfg: Runner(self, cfg).evaluate(cfg.weights)),
            Command("embed", "pooled features of every FASTA record to .npy or .h5", EmbedConfig, embed),
            Command("predict", "class of every FASTA record from a fine-tuned run (TSV)", PredictConfig, predict),
        ]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        return _demo(self, out_dir, smoke)


class PretrainApp(Application):
    """Next-token pretraining of the HyenaDNA LM; eval reports perplexity on held-out windows."""

    name = "dna-pretrain"
    help = "HyenaDNA next-token pretraining"
    config = PretrainConfig
    metrics = {"perplexity": "min", "loss": "min"}

    def build_datasets(self, cfg: PretrainConfig):
        tok = _tokenizer(cfg)
        if cfg.data == "species":
            train_regions, _, fetch = gdata.species_regions("train")
            eval_regions, _, _ = gdata.species_regions("test")
        elif cfg.train_split:
            train_regions, fetch = _data_error(gdata.fasta_regions, cfg.data, cfg.bed, cfg.train_split)
            eval_regions, _ = _data_error(gdata.fasta_regions, cfg.data, cfg.bed, cfg.eval_split)
        else:
            regions, fetch = _data_error(gdata.fasta_regions, cfg.data, cfg.bed)
            cut = [r.end - int(r.length * cfg.eval_fraction) for r in regions]
            train_regions = [gdata.Region(r.key, r.start, c) for r, c in zip(regions, cut)]
            eval_regions = [gdata.Region(r.key, c, r.end) for r, c in zip(regions, cut)]
        train = _data_error(gdata.RandomWindows, train_regions, fetch, cfg.train_size, cfg.min_len, cfg.max_len,
                            tok, cfg.seed, rc_prob=cfg.rc_aug, warmup_start=cfg.seq_len_warmup, add_eos=True)
        return train, _evenly(_data_error(gdata.TiledWindows, eval_regions, fetch, cfg.max_len, tok, add_eos=True),
                              cfg.eval_size)

    def build_model(self, cfg: PretrainConfig) -> nn.Module:
        return _initialise(build_hyenadna(model_config(cfg)), cfg)

    def collate(self, samples):
        return gdata.collate(samples)

    def train_loss(self, model, batch) -> torch.Tensor:
        ids = batch[0]
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), ignore_index=4)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        ids, mask, _ = batch
        logits = model(ids[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        valid = mask[:, :-1] & (ids[:, 1:] >= BASE_IDS)  # per base: the [SEP] and [PAD] targets do not count
        return {"nll": (nll * valid).sum(1), "tokens": valid.sum(1)}

    def compute_metrics(self, outputs):
        loss = outputs["nll"].double().sum().item() / max(1, outputs["tokens"].sum().item())
        return {"perplexity": math.exp(loss), "loss": loss}


application = DnaApp()


# ----------------------------------------------------------------------------------------------
# embed and predict


def _trained_model(cfg: EmbedConfig, n_classes: int) -> nn.Module:
    """The model of a run folder (options from its config.toml) with its best or final weights, or --init."""
    saved = Path(cfg.out_dir or "runs/dna") / "config.toml"
    if saved.is_file():
        for key, value in tomllib.loads(saved.read_text()).items():
            if key in _MODEL_FIELDS:
                setattr(cfg, key, value)
    model = build_hyenadna(model_config(cfg), n_classes, cfg.pooling)
    if cfg.weights or not cfg.init:
        out = Path(cfg.out_dir or "runs/dna")
        path = Path(cfg.weights) if cfg.weights else next(
            (p for p in (out / "best.safetensors", out / "model.safetensors") if p.exists()), out / "model.safetensors")
        load_weights(model, path)
    else:
        _initialise(model, cfg)
    return model.eval()


def _records(cfg: EmbedConfig, l_max: int) -> list[tuple[str, str]]:
    records = _data_error(gdata.read_fasta, cfg.input, cfg.unknown_as_n)
    for name, seq in records:
        if len(seq) > l_max:
            raise RunError(f"{cfg.input}: record {name!r} has {len(seq)} bases, more than the model's l_max "
                           f"{l_max}; split it or use a longer-context model")
    return records


def embed(cfg: EmbedConfig, model: nn.Module | None = None) -> Path:
    """Write the pooled features of every record of --input to a .npy or .h5 file (one record at a time,
    so only one sequence's activations are in memory)."""
    if model is None:
        classes = _classes(cfg, required=False)
        model = _trained_model(cfg, len(classes) if classes else 0)
    backbone = model.backbone
    pooling = getattr(model, "pooling", cfg.pooling)
    tok = _tokenizer(cfg)
    output = Path(cfg.output or Path(cfg.out_dir or "runs/dna") / "embeddings.npy")
    if output.suffix not in (".npy", ".h5"):
        raise RunError(f"--output {output}: the embeddings are written as .npy or .h5, not {output.suffix!r}")
    names, rows = [], []
    with torch.no_grad():
        for name, seq in _records(cfg, backbone.config.l_max):
            names.append(name)
            rows.append(pool(backbone(tok.encode(seq)[None]), None, pooling)[0].float().numpy())
    output.parent.mkdir(parents=True, exist_ok=True)

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


def _classes(cfg: EmbedConfig, required: bool = True) -> list[str] | None:
    path = Path(cfg.out_dir or "runs/dna") / "classes.json"
    if not path.is_file():
        if required:
            raise RunError(f"{path} does not exist: predict needs a run folder written by `ssmkit dna finetune`")
        return None
    return json.loads(path.read_text())


def predict(cfg: PredictConfig) -> list[dict]:
    """Predict the class of every record of --input with a fine-tuned run; writes a TSV and returns rows."""
    classes = _classes(cfg)
    model = _trained_model(cfg, len(classes))
    tok = _tokenizer(cfg)
    rows = []
    with torch.no_grad():
        for name, seq in _records(cfg, model.config.l_max):
            prob = model(tok.encode(seq)[None]).float().softmax(-1)[0]
            rows.append({"record": name, "class": classes[int(prob.argmax())], "probability": float(prob.max())})
    output = Path(cfg.output or Path(cfg.out_dir or "runs/dna") / "predictions.tsv")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("record\tclass\tprobability\n" + "".join(
        f"{r['record']}\t{r['class']}\t{r['probability']:.4f}\n" for r in rows))
    for r in rows[:20]:
        print(f"{r['record']}\t{r['class']}\t{r['probability']:.3f}")
    print(f"dna predict: {len(rows)} records -> {output}")
    return rows


# ----------------------------------------------------------------------------------------------
# demo


def composition_perplexity(train: gdata.RandomWindows, eval_set) -> float:
    """Per-base perplexity on the windows of `eval_set` (the targets the LM's eval scores) of a predictor that
    knows only the base frequencies of the training regions: what pretraining must beat to have learned more
    than composition (4 is the uniform predictor)."""
    counts = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    for r in train.regions:
        counts += torch.bincount(train.tokenizer.encode(train.fetch(r.key, r.start, r.end)), minlength=VOCAB_SIZE)
    logp = torch.full((VOCAB_SIZE,), -math.inf, dtype=torch.float64)
    logp[BASE_IDS:] = ((counts[BASE_IDS:] + 1) / (counts[BASE_IDS:] + 1).sum()).log()
    targets = torch.cat([ids[1:] for ids, _ in eval_set])
    return math.exp(-logp[targets[targets >= BASE_IDS]].mean().item())


def _demo(app: DnaApp, out_dir: Path, smoke: bool) -> ReportSection:
    sizes = dict(d_model=16, d_inner=32, n_layer=1, train_size=64, min_len=64, max_len=64, batch_size=8,
                 steps=3, warmup_steps=1, eval_every=0, log_every=3, eval_size=24) if smoke else \
        dict(d_model=32, d_inner=64, n_layer=2, train_size=1024, min_len=200, max_len=200, batch_size=16,
             warmup_steps=5, eval_every=0, log_every=20, eval_size=160)
    # pretraining: windows from 50 bases doubling per epoch of 64 steps (sequence-length warm-up) to 200
    pre_cfg = PretrainConfig(out_dir=str(out_dir / "dna-pretrain"), overwrite=True,
                             **{**sizes, **(dict(steps=2) if smoke else dict(steps=300, warmup_steps=10,
                                                                             seq_len_warmup=50, log_every=50))})
    pre_cfg.validate()
    pre_app = PretrainApp()
    pre = Runner(pre_app, pre_cfg).train()
    composition = composition_perplexity(*pre_app.build_datasets(pre_cfg))
    runs = {}
    for start, folder, init in (("from scratch", "scratch", ""),
                                ("from the pretrained LM", "pretrained", str(pre.out_dir / "model.safetensors"))):
        cfg = DnaConfig(out_dir=str(out_dir / app.name / folder), overwrite=True, init=init,
                        **{**sizes, "steps": 3 if smoke else 60})
        cfg.validate()
        runs[start] = app.finetune(cfg)
    n_params = sum(p.numel() for p in build_hyenadna(model_config(cfg), len(app.classes)).parameters())
    chance = 1 / len(app.classes)
    ppl = pre.metrics["perplexity"]
    text = (
        f"A {cfg.n_layer}-layer HyenaDNA (`hyenadna_tiny_1k` sized down to d_model {cfg.d_model}, MLP "
        f"{cfg.d_inner}; {n_params:,} parameters with the {len(app.classes)}-class head; the published tiny-1k "
        f"has 436,096) on real DNA shipped in Debian packages: human chrX, P. falciparum, E. coli 536 and "
        f"Drosophila upstream regions (`ssmkit/genomics/fixtures/species.fa.gz`).\n\n"
        f"The LM is pretrained for {pre.step} steps of {pre_cfg.batch_size} windows on next-token prediction over "
        f"the training regions, the windows growing from {pre_cfg.seq_len_warmup or pre_cfg.max_len} to "
        f"{pre_cfg.max_len} bp (sequence-length warm-up). Its perplexity per base on held-out windows is "
        f"{ppl:.3f}, against 4 for a model that knows nothing (uniform over A, C, G, T) and {composition:.3f} for "
        f"one that knows only the base composition of the training regions. A classifier is then fine-tuned "
        f"for {runs['from scratch'].step} steps to tell the species of a {cfg.max_len}-bp window (mean pooling, "
        f"reverse-complement augmentation), from the pretrained backbone and, for comparison, from scratch; "
        f"chance accuracy is 1/{len(app.classes)}. Eval windows come from a held-out region of each species "
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
    table = Table(f"Species of origin on held-out regions ({len(app.classes)} classes)",
                  ["fine-tuned", "accuracy", "MCC", "macro-F1", "loss"], rows)
    return ReportSection("DNA with HyenaDNA (ssmkit dna)", text, metrics,
                         images=[*pre.plots, *runs["from the pretrained LM"].plots], tables=[table])
