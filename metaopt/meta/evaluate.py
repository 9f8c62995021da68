"""Held-out evaluation: train fresh tasks with a learned rule and with tuned baselines.

Every optimizer here is an ordinary ``torch.optim.Optimizer`` driven through ``step(closure)``,
so the learned rule is evaluated exactly as a user would run it (``LearnedOptimizer``), and any
baseline from ``conf/optimizer`` plugs in unchanged.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from metaopt.tasks.base import Task, TaskFamily


@dataclass
class RunResult:
    optimizer: str
    task: str
    seed: int
    lr: Optional[float]
    steps: List[int]
    valid_losses: List[float]
    final_valid: float
    final_test: float
    diverged: bool = False
    extra: Dict[str, float] = field(default_factory=dict)


def optimizer_step(opt, task: Task, params, batch) -> bool:
    """One ``opt.step(closure)`` on ``batch`` (the closure zeroes, computes the loss and
    backpropagates); False if the returned loss is not finite."""
    def closure():
        opt.zero_grad()
        loss = task.loss(params, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    return loss is None or math.isfinite(float(torch.as_tensor(loss).detach()))


def run_steps(opt, task: Task, params, gen: torch.Generator, steps: int, eval_every: int,
              measure: Callable[[], float], on_step: Optional[Callable[[int], None]] = None):
    """The training loop shared by the evaluations: ``steps`` optimizer steps on batches from
    ``gen``; ``measure()`` (under no_grad) at step 0, every ``eval_every`` steps and at the end.
    Stops at the first non-finite loss or measurement (kept as the last point).
    ``on_step(t)`` runs after every step. Returns (steps, measurements, diverged)."""
    with torch.no_grad():
        xs, ys = [0], [measure()]
    for t in range(1, steps + 1):
        if not optimizer_step(opt, task, params, task.sample_batch("train", gen)):
            return xs, ys, True
        if t % eval_every == 0 or t == steps:
            with torch.no_grad():
                xs.append(t)
                ys.append(measure())
            if not math.isfinite(ys[-1]):
                return xs, ys, True
        if on_step is not None:
            on_step(t)
    return xs, ys, False


def train_task(task: Task, make_opt: Callable, steps: int, seed: int, eval_every: int = 25,
               dtype: torch.dtype = torch.float32, name: str = "opt", lr=None) -> RunResult:
    """Train ``task`` from its seeded init for ``steps`` steps; full-split validation loss every
    ``eval_every`` steps. A non-finite loss stops the run and marks it diverged (loss = inf)."""
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in task.init_params(gen).items()}
    opt = make_opt(list(params.items()), task)
    valid = task.full_batch("valid")
    xs, ys, diverged = run_steps(opt, task, params, gen, steps, eval_every,
                                 lambda: float(task.loss(params, valid)))
    if diverged:
        final_valid = final_test = math.inf
    else:
        with torch.no_grad():
            final_valid = ys[-1]
            final_test = float(task.loss(params, task.full_batch("test")))
    if hasattr(opt, "close"):
        opt.close()
    return RunResult(name, task.name, seed, lr, xs, ys, final_valid, final_test, diverged)


def tune_lr(task: Task, factory: Callable[[float], Callable], grid: Sequence[float], steps: int,
            seed: int, name: str, **kw) -> RunResult:
    """Best run over a learning-rate grid, chosen by final validation loss (on this task)."""
    best = None
    for lr in grid:
        r = train_task(task, factory(lr), steps, seed, name=name, lr=lr, **kw)
        if best is None or r.final_valid < best.final_valid:
            best = r
    return best


def compare(families: Sequence[Tuple[str, TaskFamily]], seeds: Sequence[int],
            runs: Callable[[Task, int], List[RunResult]]) -> Tuple[List[Dict], List[Dict]]:
    """``runs(task, seed)`` on the task of every seed of every ``(name, family)``: one results row
    per task x optimizer and the validation curves, as ``metaopt-eval`` writes them."""
    results, curves = [], []
    for fam_name, family in families:
        for seed in seeds:
            task = family.sample_seeded(seed)
            for r in runs(task, seed):
                results.append(dict(family=fam_name, task_seed=seed, structure=str(task.structure),
                                    optimizer=r.optimizer, lr=r.lr, final_valid=r.final_valid,
                                    final_test=r.final_test, diverged=r.diverged))
                curves += [dict(family=fam_name, task_seed=seed, optimizer=r.optimizer, step=s,
                                valid_loss=v) for s, v in zip(r.steps, r.valid_losses)]
    return results, curves


def summarize(results: List[Dict]) -> str:
    """Markdown table: mean final valid/test loss per family x optimizer, and how often each
    optimizer beats Adam at the reference learning rate on the same task."""
    ref = {(r["family"], r["task_seed"]): r["final_valid"] for r in results
           if r["optimizer"].startswith("adam@")}
    rows: Dict = {}
    for r in results:
        d = rows.setdefault((r["family"], r["optimizer"]), {"v": [], "t": [], "w": 0, "lr": []})
        d["v"].append(r["final_valid"])
        d["t"].append(r["final_test"])
        d["w"] += int(r["final_valid"] < ref.get((r["family"], r["task_seed"]), math.inf))
        if r["lr"] is not None:
            d["lr"].append(r["lr"])
    lines = ["| family | optimizer | mean valid loss | mean test loss | beats adam@ref | lrs chosen |",
             "|---|---|---|---|---|---|"]
    for (fam, opt), d in rows.items():
        n = len(d["v"])
        lrs = ",".join(f"{x:g}" for x in d["lr"]) if d["lr"] else "-"
        beats = "-" if opt.startswith("adam@") else f"{d['w']}/{n}"
        lines.append(f"| {fam} | {opt} | {sum(d['v']) / n:.4f} | {sum(d['t']) / n:.4f} | {beats} | {lrs} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: List[Dict]) -> None:
    """``rows`` (dicts with the first row's keys) as a CSV file with a header; nothing when empty."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
