"""HyenaDNA benchmark: tokens/s and peak memory of HyenaDNA vs a same-width causal Transformer.

For each sequence length, forward (no grad) and forward+backward of one sequence (batch 1) are timed for
HyenaDNA-tiny (d_model 128, 2 layers, d_inner 512; its l_max set to the length) and for a Transformer of
the same width and depth (pre-norm blocks, 4 heads, causal `scaled_dot_product_attention`, the same
GELU MLP and tied embedding). Each measurement runs in a fresh subprocess (so the CPU peak memory, the
high-water RSS above the model and inputs, belongs to it alone) with `--threads` torch threads under a
time limit; a run past the limit or out of memory is reported as skipped with the reason, and its time is
extrapolated from the model's two longest measured lengths as t ~ L^p (p fitted, about 2 for attention),
marked as such. A length whose extrapolated time exceeds the limit is not run. Lengths listed in
--forward-only are timed without backward. Times are wall clock; each row gives the measurement's CPU share
(CPU time / (wall time x threads): 1.0 when it had its cores to itself, lower when the machine was loaded).

    python bench/dna.py                                    # CPU: 1k, 8k, 32k; 160k and 1M forward only
    python bench/dna.py --lengths 1024,32768,163840 --forward-only 1048576 --device cuda

Prints a Markdown table with the HyenaDNA / Transformer speed ratio beside the paper's claim (160x faster
than FlashAttention at 1M tokens, forward+backward on an A100) and writes JSON (bench/results/dna.json).

`--species-minutes M` instead measures accuracy on the embedded species task (4 species, held-out regions)
reached by the published tiny-1k model in M CPU minutes per arm: `scratch` fine-tunes for the whole budget,
`pretrained` spends `--pretrain-share` of it on next-token pretraining (1000-bp windows) and the rest on
fine-tuning from that backbone. The cost of a step is calibrated first on real batches as process CPU time
per torch thread (as in bench/fashion_mnist.py), so a machine shared with other jobs gives the same step
counts; the learning-rate schedules then see their step counts up front. Writes bench/results/dna_species.json.

    python bench/dna.py --species-minutes 20 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _measure import measure_fwd_bwd

CLAIM = "HyenaDNA paper: 160x faster than FlashAttention at 1M tokens (fwd+bwd, A100)"


def build(model: str, length: int, d_model: int, n_layer: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if model == "hyenadna":
        import ssmkit

        return ssmkit.create_model("hyenadna_tiny_1k", d_model=d_model, n_layer=n_layer, d_inner=4 * d_model,
                                   l_max=length, embed_dropout=0.0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.fc1, self.fc2 = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

        def forward(self, x):
            B, L, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, 4, d_model // 4).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, L, d_model))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.norm = nn.LayerNorm(d_model)

        def forward(self, ids):
            x = self.emb(ids)
            for block in self.blocks:
                x = block(x)
            return self.norm(x) @ self.emb.weight.T

    torch.manual_seed(0)
    return Transformer()


def _forward_only(model, ids, device: str, repeats: int) -> dict:
    """Peak memory and median/best time (ms) of a no-grad forward (for lengths too long to train on here)."""
    import statistics
    import time

    import torch

    from _measure import peak_rss_bytes, reset_peak_rss, rss_bytes

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset_peak_rss()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else max(peak_rss_bytes() - base, 0)
    return dict(fwd_ms=statistics.median(times) * 1e3, fwd_min_ms=min(times) * 1e3, peak_mb=peak / 2**20,
                threads=torch.get_num_threads())


def worker(args) -> None:
    import time

    import torch

    torch.set_num_threads(args.threads)
    model = build(args.model, args.length, args.d_model, args.n_layer).to(args.device)
    ids = torch.randint(7, 11, (1, args.length), device=args.device)
    cpu, wall = time.process_time(), time.perf_counter()
    if args.mode == "fwd":
        row = _forward_only(model, ids, args.device, args.repeats)
    else:
        row = measure_fwd_bwd(lambda x: model(x).float(), (ids,), args.device, args.repeats, warmup=1)
        model.zero_grad(set_to_none=True)
    # CPU time over wall time x threads: 1.0 when the measurement had its cores to itself, less under load
    cpu_share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * args.threads)
    row.update(model=args.model, length=args.length, mode=args.mode, cpu_share=round(cpu_share, 3),
               params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(row))


def _step_seconds(app, cfg, steps: int) -> float:
    """Median CPU seconds per torch thread of one AdamW step (clipped, as in the runner) of `app` on real
    batches of `cfg` (after one warm-up step)."""
    import statistics
    import time

    import torch

    from ssmkit.apps.application import RunContext
    from ssmkit.apps.runner import parameter_groups

    spec = app.setup(cfg)
    train, ctx = spec.train, RunContext(cfg, spec.meta)
    torch.manual_seed(cfg.seed)
    model = app.build_model(ctx)
    opt = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    now = lambda: time.process_time() / torch.get_num_threads()  # noqa: E731
    times = []
    for i in range(steps + 1):
        batch = app.collate([train[j] for j in range(i * cfg.batch_size, (i + 1) * cfg.batch_size)])
        t0 = now()
        app.train_loss(model, batch, ctx).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(now() - t0)
    return statistics.median(times)


def species(args) -> None:
    """Accuracy and MCC on the embedded species task after `args.species_minutes` CPU minutes per arm."""
    import time

    import torch

    from ssmkit.apps.dna import DnaFinetune, DnaPretrain, PretrainApp, application
    from ssmkit.apps.runner import Runner

    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    common = dict(model="hyenadna_tiny_1k", batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=0,
                  log_every=100, overwrite=True)

    def finetune_cfg(steps: int, init: str, out: str):
        return DnaFinetune(**common, steps=steps, warmup_steps=max(1, steps // 50), checkpoint_every=steps,
                           eval_size=args.eval_size, init=init, out_dir=str(runs / out))

    def pretrain_cfg(steps: int):
        return DnaPretrain(**common, steps=steps, warmup_steps=max(1, steps // 50), checkpoint_every=steps,
                           min_len=args.pretrain_len, max_len=args.pretrain_len, out_dir=str(runs / "pretrain"))

    budget = args.species_minutes * 60
    ft_step = _step_seconds(application, finetune_cfg(1, "", "calibrate"), args.calibrate_steps)
    rows = []
    for arm in args.species_arms.split(","):
        start = time.perf_counter()
        row = dict(arm=arm, finetune_step_s=ft_step)
        init, ft_budget = "", budget
        if arm == "pretrained":
            pre_step = _step_seconds(PretrainApp(), pretrain_cfg(1), args.calibrate_steps)
            pre_steps = max(1, int(budget * args.pretrain_share / pre_step))
            print(f"pretrained arm: {pre_step:.3f} CPU s/step -> {pre_steps} pretraining steps", flush=True)
            pre = Runner(PretrainApp(), pretrain_cfg(pre_steps)).train()
            init, ft_budget = str(pre.out_dir / "model.safetensors"), budget * (1 - args.pretrain_share)
            row.update(pretrain_step_s=pre_step, pretrain_steps=pre_steps, perplexity=pre.metrics["perplexity"])
        elif arm != "scratch":
            raise SystemExit(f"--species-arms: unknown arm {arm!r} (scratch, pretrained)")
        steps = max(1, int(ft_budget / ft_step))
        print(f"{arm} arm: {ft_step:.3f} CPU s/step -> {steps} fine-tuning steps", flush=True)
        result = Runner(application, finetune_cfg(steps, init, arm)).train()
        row.update(finetune_steps=steps, accuracy=result.metrics["accuracy"], mcc=result.metrics["mcc"],
                   f1=result.metrics["f1"], wall_minutes=(time.perf_counter() - start) / 60)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"Species of origin (4 classes, held-out regions, {args.eval_size} eval windows at most) after "
             f"{args.species_minutes:g} CPU minutes per arm, hyenadna_tiny_1k, batch {args.batch_size}, lr {args.lr:g}, "
             f"{args.threads} thread(s)", "",
             "| arm | pretraining steps | held-out perplexity | fine-tuning steps | accuracy | MCC | macro-F1 | wall min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r.get('pretrain_steps', 0)} | {r.get('perplexity', float('nan')):.3f} | "
                     f"{r['finetune_steps']} | {r['accuracy']:.3f} | {r['mcc']:.3f} | {r['f1']:.3f} | "
                     f"{r['wall_minutes']:.1f} |")
    print("\n".join(lines))
    out = Path(args.species_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(minutes=args.species_minutes, threads=args.threads, batch_size=args.batch_size, lr=args.lr,
                pretrain_share=args.pretrain_share, pretrain_len=args.pretrain_len, machine=platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, clock="process CPU time per thread")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,8192,32768", help="lengths timed forward and forward+backward")
    parser.add_argument("--forward-only", default="163840,1048576", help="lengths timed forward only (empty: none)")
    parser.add_argument("--models", default="hyenadna,transformer")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds per measurement before it is skipped (and extrapolated); a length whose "
                             "extrapolated time exceeds it is not run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dna.json"))
    parser.add_argument("--species-minutes", type=float, default=0,
                        help="instead of timing: species-task accuracy after this many CPU minutes per arm")
    parser.add_argument("--species-arms", default="scratch,pretrained", help="scratch and/or pretrained")
    parser.add_argument("--pretrain-share", type=float, default=0.5, help="budget share of pretraining (pretrained arm)")
    parser.add_argument("--pretrain-len", type=int, default=1000, help="pretraining window in bases")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=6e-4, help="peak AdamW learning rate (HyenaDNA's recipe)")
    parser.add_argument("--eval-size", type=int, default=1000, help="species eval windows (at most)")
    parser.add_argument("--calibrate-steps", type=int, default=4, help="timed steps that set the step counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every measurement and species run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/bench_dna", help="folder of the species runs")
    parser.add_argument("--species-out", default=str(Path(__file__).parent / "results" / "dna_species.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.species_minutes > 0:
        return species(args)

    plan = [(int(n), "fwd+bwd") for n in args.lengths.split(",") if n] + \
           [(int(n), "fwd") for n in args.forward_only.split(",") if n]
    rows = []
    for length, mode in plan:
        for model in args.models.split(","):
            estimate = extrapolate(rows, model, length, mode)
            if estimate is not None and estimate["ms"] > 1e3 * args.timeout:
                row = dict(model=model, length=length, mode=mode, skipped=f"extrapolated over {args.timeout:.0f} s")
            else:
                row = measure(args, model, length, mode)
            if "skipped" in row and estimate is not None:
                row["extrapolated"] = estimate
            key = "fwd_bwd_ms" if mode == "fwd+bwd" else "fwd_ms"
            if key in row:
                row["tokens_per_s"] = length / (row[key] / 1e3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n".join(table(rows, plan, args)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "claim": CLAIM, "d_model": args.d_model, "threads": args.threads,
                                          "n_layer": args.n_layer, "device": args.device}, indent=2) + "\n")


def measure(args, model: str, length: int, mode: str) -> dict:
    """One timing in a fresh process, or a row saying why it was skipped (time limit, error)."""
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--length", str(length), "--mode", mode,
           "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--device", args.device,
           "--threads", str(args.threads), "--repeats", str(args.repeats if length < 32768 else 1)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if out.returncode != 0:
            raise RuntimeError((out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1])
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, RuntimeError) as e:
        reason = f"over {args.timeout:.0f} s" if isinstance(e, subprocess.TimeoutExpired) else str(e)[:120]
        return dict(model=model, length=length, mode=mode, skipped=reason)


def extrapolate(rows: list[dict], model: str, length: int, mode: str) -> dict | None:
    """Estimated time of `model` at `length` from its two longest shorter measurements of the same kind
    (forward times also come from forward+backward rows): t ~ L^p with p fitted to those two points
    (about 2 once attention dominates a Transformer, about 1 for HyenaDNA). None without two points."""
    import math

    key = "fwd_bwd_ms" if mode == "fwd+bwd" else "fwd_ms"
    points = sorted({r["length"]: r[key] for r in rows if r["model"] == model and key in r and r["length"] < length}
                    .items())
    if len(points) < 2:
        return None
    (l1, t1), (l2, t2) = points[-2:]
    p = math.log(t2 / t1) / math.log(l2 / l1)
    return dict(ms=t2 * (length / l2) ** p, exponent=round(p, 3), from_length=l2)


def table(rows: list[dict], plan: list[tuple[int, str]], args) -> list[str]:
    """Markdown table: time, tokens/s, peak memory, HyenaDNA speed-up (extrapolated times marked ~)."""
    lines = [f"HyenaDNA (d_model {args.d_model}, {args.n_layer} layers) vs a same-width SDPA Transformer, batch 1, "
             f"{args.device} ({platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)); "
             f"~: extrapolated as t ~ L^p from the two longest measured lengths (p given)", "",
             "| length | mode | model | ms | tokens/s | peak MiB | CPU share | Hyena speed-up |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for length, mode in plan:
        key = "fwd_bwd_ms" if mode == "fwd+bwd" else "fwd_ms"
        found = {r["model"]: r for r in rows if r["length"] == length and r["mode"] == mode}
        ms = {name: r[key] if key in r else r.get("extrapolated", {}).get("ms") for name, r in found.items()}
        hy, tf = ms.get("hyenadna"), ms.get("transformer")
        guessed = any(key not in found[name] for name in ("hyenadna", "transformer") if name in found)
        ratio = f"{'~' if guessed else ''}{tf / hy:.1f}x" if hy and tf else "-"
        for name, r in found.items():
            if key in r:
                cell = f"{r[key]:.0f}"
            elif "extrapolated" in r:
                e = r["extrapolated"]
                cell = f"~{e['ms']:.0f} (p={e['exponent']:.2f}; {r['skipped']})"
            else:
                cell = r["skipped"]
            lines.append(f"| {length} | {mode} | {name} | {cell} | "
                         f"{length / (ms[name] / 1e3) if ms[name] else 0:.0f} | {r.get('peak_mb', float('nan')):.0f} | "
                         f"{r.get('cpu_share', float('nan')):.2f} | {ratio if name == 'hyenadna' else ''} |")
    return lines + ["", CLAIM]

if __name__ == "__main__":
    main()
