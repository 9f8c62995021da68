"""Quality check at ~2M parameters, CPU only: the shipped learned optimizer vs AdamW on a char GPT.

A decoder-only, pre-LN, causal character-level GPT (d_model 200, 4 layers, 4 heads, context
128, ~2.0M parameters) trained on :func:`metaopt.tasks.data.load_text` (Python's own stdlib
docstrings; the first 90% of the characters for training, the last 10% held out for
validation) with

* ``LearnedOptimizer.from_pretrained(model.named_parameters(), "default")`` -- no tuning, and
* ``torch.optim.AdamW(lr, weight_decay=0.01, foreach=True)`` at lr 1e-3, 3e-3 and 1e-2,

from the same initial weights (one seed) and on the same batches. Train loss is recorded every
10 steps, validation loss (nats and bits per character, on a fixed set of held-out windows)
every 50 steps and at the end, and the wall time of each run. Writes

* ``results/gpt_quality.json``  config, every curve, final figures,
* ``results/gpt_quality.md``    the table (final train / val loss, val bpc, wall s),
* ``results/gpt_quality.png``   train and validation loss curves.

    OMP_NUM_THREADS=1 python benchmarks/gpt_quality.py                 # 300 steps, ~8 min
    OMP_NUM_THREADS=1 python benchmarks/gpt_quality.py --steps 20      # a smoke run

This is the CPU version (one thread); a ~10M-parameter GPU version is not part of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, set_threads  # noqa: E402

from metaopt import LearnedOptimizer  # noqa: E402
from metaopt.tasks.charlm import CharLMModule  # noqa: E402
from metaopt.tasks.data import CharVocab, load_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ADAMW_LRS = (1e-3, 3e-3, 1e-2)
LN2 = math.log(2.0)


def gpt(vocab: int, ctx: int, d: int, n_layers: int, n_heads: int) -> CharLMModule:
    """The project's pre-LN causal character LM (:class:`metaopt.tasks.charlm.CharLMModule`:
    token + learned position embeddings, blocks, final LN, head; ``model(x, y)`` is the mean
    next-character cross entropy) with GPT-2 style initialization."""
    model = CharLMModule(vocab, ctx, d, n_layers, n_heads)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def windows(tokens, starts, ctx):
    idx = starts[:, None] + torch.arange(ctx + 1)[None, :]
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, val_x, val_y, chunk: int = 16) -> float:
    model.eval()
    tot = 0.0
    for i in range(0, len(val_x), chunk):
        xb, yb = val_x[i:i + chunk], val_y[i:i + chunk]
        tot += float(model(xb, yb)) * len(xb)
    model.train()
    return tot / len(val_x)


def run_one(label, make_opt, init_state, cfg, batches, val_x, val_y):
    model = gpt(cfg["vocab"], cfg["ctx"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"])
    model.load_state_dict(init_state)
    opt = make_opt(model)
    train, val = [], []
    steps = cfg["steps"]
    t_train = 0.0
    t0 = time.perf_counter()
    val.append([0, evaluate(model, val_x, val_y)])
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        xb, yb = batches[step - 1]
        loss = model(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        t_train += time.perf_counter() - ts
        if not math.isfinite(lv):
            print(f"  {label}: non-finite loss at step {step}; stopping this run", flush=True)
            train.append([step, lv])
            break
        if step % 10 == 0 or step == 1 or step == steps:
            train.append([step, lv])
        if step % 50 == 0 or step == steps:
            v = evaluate(model, val_x, val_y)
            val.append([step, v])
            print(f"  {label:>14s} step {step:4d}  train {lv:.4f}  val {v:.4f} "
                  f"({v / LN2:.3f} bpc)  {time.perf_counter() - t0:6.1f}s", flush=True)
    wall = time.perf_counter() - t0
    # also the mean of the last 5 recorded train losses (every 10 steps): less noisy than one
    tail = [v for _, v in train[-5:]]
    return {
        "optimizer": label,
        "train_curve": train,
        "val_curve": val,
        "final_train_loss": train[-1][1],
        "final_train_loss_last5_mean": sum(tail) / len(tail),
        "final_val_loss": val[-1][1],
        "final_val_bpc": val[-1][1] / LN2,
        "best_val_loss": min(v for _, v in val),
        "wall_s": wall,
        "train_step_s_total": t_train,
        "steps_done": train[-1][0],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "gpt_quality"))
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    head = header("gpt_quality (CPU, ~2M-parameter char GPT)", threads)
    print(head, flush=True)

    text = load_text()
    vocab = CharVocab.from_text(text)
    tokens = vocab.encode(text)
    n_train = int(0.9 * len(tokens))
    tr, va = tokens[:n_train], tokens[n_train:]
    g = torch.Generator().manual_seed(args.seed)
    batches = [windows(tr, torch.randint(0, len(tr) - args.ctx - 1, (args.batch,), generator=g),
                       args.ctx) for _ in range(args.steps)]
    vs = torch.linspace(0, len(va) - args.ctx - 2, args.val_windows).long()  # evenly spread, fixed
    val_x, val_y = windows(va, vs, args.ctx)

    cfg = dict(vocab=len(vocab), ctx=args.ctx, d_model=args.d_model, n_layers=args.layers,
               n_heads=args.heads, steps=args.steps, batch=args.batch, seed=args.seed)
    torch.manual_seed(args.seed)
    m0 = gpt(cfg["vocab"], cfg["ctx"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"])
    n_params = sum(p.numel() for p in m0.parameters())
    init_state = {k: v.clone() for k, v in m0.state_dict().items()}
    del m0
    print(f"text {len(tokens):,} chars (train {len(tr):,} / val {len(va):,}), vocab {len(vocab)}, "
          f"params {n_params:,}, {args.steps} steps x {args.batch} x {args.ctx} tokens, "
          f"val {args.val_windows} x {args.ctx} chars", flush=True)

    runs = [("learned/default",
             lambda m: LearnedOptimizer.from_pretrained(m.named_parameters(), "default"))]
    for lr in ADAMW_LRS:
        runs.append((f"AdamW lr={lr:g}",
                     lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01,
                                                        foreach=True)))
    rows = []
    for label, make in runs:
        print(f"-- {label}", flush=True)
        rows.append(run_one(label, make, init_state, cfg, batches, val_x, val_y))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg.update(n_params=n_params, text_chars=len(tokens), train_chars=len(tr), val_chars=len(va),
               val_windows=args.val_windows, threads=threads, device="cpu",
               adamw=dict(weight_decay=0.01, foreach=True, lrs=list(ADAMW_LRS)),
               learned="LearnedOptimizer.from_pretrained(model.named_parameters(), 'default')")
    cmd = "OMP_NUM_THREADS=1 python benchmarks/gpt_quality.py" + (
        f" --steps {args.steps}" if args.steps != 300 else "") + (
        f" --seed {args.seed}" if args.seed else "")
    out.with_suffix(".json").write_text(json.dumps(
        {"header": head, "command": cmd, "config": cfg, "runs": rows}, indent=1) + "\n")

    best_adamw = min((r for r in rows if r["optimizer"].startswith("AdamW")),
                     key=lambda r: r["final_val_loss"])
    lines = [
        "# GPT quality check at ~2M parameters (CPU only)", "",
        f"`{cmd}`", "", "```", head, "```", "",
        f"Char-level pre-LN causal GPT, {n_params:,} parameters (d_model {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, context {args.ctx}), vocab {len(vocab)}, "
        f"on `load_text()` ({len(tr):,} train / {len(va):,} held-out chars). {args.steps} steps, "
        f"batch {args.batch} x {args.ctx}, seed {args.seed}: same init, same batches for every "
        f"optimizer. Validation: {args.val_windows} fixed held-out windows of {args.ctx} chars. "
        "Learned: the shipped `default` rule, untuned. AdamW: weight_decay 0.01, foreach. "
        "One CPU thread; one seed, so differences of a few hundredths are within noise.", "",
        "| optimizer | final train loss | train loss (mean last 5 logs) | final val loss | "
        "val bpc | best val loss | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['final_train_loss']:.4f} | "
                     f"{r['final_train_loss_last5_mean']:.4f} | {r['final_val_loss']:.4f} | "
                     f"{r['final_val_bpc']:.3f} | {r['best_val_loss']:.4f} | {r['wall_s']:.1f} |")
    lr_ = rows[0]
    lines += ["", f"Learned/default final val bpc {lr_['final_val_bpc']:.3f} vs best AdamW "
              f"({best_adamw['optimizer']}) {best_adamw['final_val_bpc']:.3f}: "
              f"difference {lr_['final_val_bpc'] - best_adamw['final_val_bpc']:+.3f} bpc.",
              "", "Wall s includes the validation passes. The ~10M-parameter GPU version of this "
              "check was not run (no GPU lent).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines[lines.index("| optimizer | final train loss | train loss (mean last 5 logs) | "
                                      "final val loss | val bpc | best val loss | wall s |"):]))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        s, v = zip(*r["train_curve"])
        axes[0].plot(s, v, label=r["optimizer"])
        s, v = zip(*r["val_curve"])
        axes[1].plot(s, [x / LN2 for x in v], marker="o", label=r["optimizer"])
    axes[0].set(title="train loss (nats/char)", xlabel="step", ylim=(None, 4.0))
    axes[1].set(title="validation (bits/char)", xlabel="step", ylim=(None, 5.5))
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"char GPT {n_params / 1e6:.2f}M params, CPU, {args.steps} steps, seed {args.seed}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out}.json / .md / .png")


if __name__ == "__main__":
    main()
