"""The field's yardstick for learned optimizers: speedup over learning-rate-tuned Adam.

Following learned_optimization's ``speedup over Adam`` (used by VeLO and Celo):

1. Train each task with Adam at every learning rate of a grid (default 1e-4 .. 1e-1 in
   half-decades, 7 values) for ``k * S`` steps and record the *running minimum* of the training
   loss (evaluated on a fixed subset of the training split every ``eval_every`` steps).
2. The Adam *envelope* is the pointwise minimum of those running-min curves over the grid: at
   every step, the best Adam had to offer, with hindsight over the learning rate.
3. An optimizer trained for ``S`` steps reaches running-min loss ``L``; its speedup is
   (first step at which the envelope reaches ``L``) / ``S``. 1.0 means "as fast as Adam with
   the best learning rate for this step budget"; 2.0 means Adam needs twice as many steps; the
   value is capped at ``k`` (Adam never gets there within ``k * S`` steps). Tuned Adam itself
   scores <= 1 by construction.

Across tasks we report the inter-quartile mean (IQM: the mean of the middle 50%, robust to one
task's outlier, as in Celo) and count divergences (non-finite loss, or a loss at step S above
the initial loss).

Every optimizer is an ordinary ``torch.optim.Optimizer`` built by a factory from the task's
``named_parameters``-style list and stepped with ``loss.backward(); opt.step()`` -- exactly how a
user runs it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from metaopt.meta.evaluate import run_steps
from metaopt.tasks.base import Task

ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class Curve:
    """Training-loss curve of one run: ``losses[i]`` at step ``steps[i]`` (step 0 = init)."""
    optimizer: str
    task: str
    seed: int
    steps: List[int]
    losses: List[float]
    valid_at: Dict[str, float] = field(default_factory=dict)  # step (as str) -> valid loss
    diverged: bool = False
    seconds: float = 0.0

    def running_min(self) -> List[float]:
        out, best = [], math.inf
        for v in self.losses:
            best = min(best, v) if math.isfinite(v) else best
            out.append(best)
        return out

    def loss_at(self, step: int) -> float:
        """Running-min training loss at ``step`` (the last evaluation at or before it)."""
        rm = self.running_min()
        best = math.inf
        for s, v in zip(self.steps, rm):
            if s > step:
                break
            best = v
        return best


def _eval_batch(task: Task, max_examples: int):
    batch = task.full_batch("train")
    return tuple(b[:max_examples] for b in batch)


def eval_grid(steps: int, eval_every: int) -> List[int]:
    """The steps at which a run's training loss is recorded (step 0 = the init)."""
    grid = list(range(0, steps + 1, eval_every))
    return grid + ([steps] if steps % eval_every else [])


def _on_grid(c: Curve, steps: int, eval_every: int) -> Curve:
    """``c`` on the standard grid (a diverged run's missing points are +inf)."""
    at = dict(zip(c.steps, c.losses))
    grid = eval_grid(steps, eval_every)
    c.steps, c.losses = grid, [at.get(s, math.inf) for s in grid]
    return c


def train_curve(task: Task, make_opt: Callable, steps: int, seed: int, eval_every: int = 10,
                eval_examples: int = 1024, valid_steps: Sequence[int] = (),
                name: str = "opt") -> Curve:
    """Train ``task`` from its seeded init; record the training loss on a fixed train subset
    every ``eval_every`` steps, and the validation loss at ``valid_steps``. A non-finite loss
    ends the run (diverged; the remaining points are +inf)."""
    import time

    gen = torch.Generator().manual_seed(int(seed))
    params = {k: v.clone().requires_grad_(True) for k, v in task.init_params(gen).items()}
    opt = make_opt(list(params.items()))
    eval_b = _eval_batch(task, eval_examples)
    valid_b = task.full_batch("valid")
    valid = {}

    def record_valid(t):
        if t in valid_steps:
            with torch.no_grad():
                valid[str(t)] = float(task.loss(params, valid_b))

    t0 = time.perf_counter()
    xs, ys, diverged = run_steps(opt, task, params, gen, steps, eval_every,
                                 lambda: float(task.loss(params, eval_b)), record_valid)
    if hasattr(opt, "close"):
        opt.close()
    if diverged:  # the rest of the evaluation grid is +inf (same grid as a finished run)
        if not math.isfinite(ys[-1]):
            ys[-1] = math.inf
        rest = [s for s in eval_grid(steps, eval_every) if s > xs[-1]]
        xs += rest
        ys += [math.inf] * len(rest)
    return Curve(name, task.name, int(seed), xs, ys, valid, diverged, time.perf_counter() - t0)


def envelope(curves: Sequence[Curve]):
    """(steps, pointwise min over curves of their running-min losses); curves share a grid."""
    steps = curves[0].steps
    mins = [c.running_min() for c in curves]
    for c in curves:
        if c.steps != steps:
            raise ValueError("envelope: curves are on different step grids")
    return steps, [min(m[i] for m in mins) for i in range(len(steps))]


def speedup(loss: float, env_steps: Sequence[int], env_losses: Sequence[float], S: int) -> float:
    """First envelope step reaching ``loss``, divided by ``S`` (capped at max step / S)."""
    if not math.isfinite(loss):
        return 0.0
    for s, v in zip(env_steps, env_losses):
        if v <= loss:
            return max(s, 1) / S
    return env_steps[-1] / S


def iqm(values: Sequence[float]) -> float:
    """Inter-quartile mean: drop the lowest and highest quarter (int(n/4) each), average the rest."""
    v = sorted(values)
    cut = int(len(v) * 0.25)
    mid = v[cut:len(v) - cut] if len(v) - 2 * cut > 0 else v
    return sum(mid) / len(mid)


# -- Adam reference runs, cached on disk (JSON; they depend only on task, seed, lr, steps) ----
def _cache_key(problem: str, seed: int, lr: float, steps: int, eval_every: int,
               eval_examples: int) -> str:
    raw = json.dumps([problem, seed, lr, steps, eval_every, eval_examples, torch.__version__])
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def adam_curves(task: Task, problem: str, seed: int, steps: int, lrs: Sequence[float],
                eval_every: int, eval_examples: int, valid_step: int,
                cache_dir: Optional[Path] = None, log: Callable[[str], None] = lambda s: None
                ) -> List[Curve]:
    out = []
    for lr in lrs:
        path = None
        if cache_dir is not None:
            key = _cache_key(problem, seed, lr, steps, eval_every, eval_examples)
            path = Path(cache_dir) / f"adam_{problem}_{seed}_{lr:g}_{key}.json"
            if path.exists():
                out.append(_on_grid(Curve(**json.loads(path.read_text())), steps, eval_every))
                continue
        c = train_curve(task, lambda named, lr=lr: torch.optim.Adam([p for _, p in named], lr=lr),
                        steps, seed, eval_every, eval_examples, valid_steps=(valid_step,),
                        name=f"adam@{lr:g}")
        log(f"  adam lr={lr:g}: loss@{valid_step}={c.loss_at(valid_step):.4g} "
            f"end={c.loss_at(steps):.4g} ({c.seconds:.0f}s)")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(c)))
        out.append(c)
    return out


@dataclass
class SpeedupRow:
    problem: str
    seed: int
    optimizer: str
    loss_at_S: float
    speedup: float
    diverged: bool
    valid_at_S: float
    adam_valid_at_S: float        # Adam with its lr tuned on validation loss at S
    adam_lr_valid: float
    adam_best_loss_at_S: float    # best single Adam lr on training loss at S
    adam_lr_train: float


def evaluate_speedup(task: Task, problem: str, seed: int, optimizers: Dict[str, Callable],
                     S: int, k: int = 4, lrs: Sequence[float] = ADAM_GRID, eval_every: int = 10,
                     eval_examples: int = 1024, cache_dir: Optional[Path] = None,
                     log: Callable[[str], None] = lambda s: None):
    """Rows (one per optimizer, plus ``adam(tuned)``) and the curves, for one task and seed."""
    adams = adam_curves(task, problem, seed, k * S, lrs, eval_every, eval_examples, S,
                        cache_dir, log)
    env_steps, env_losses = envelope(adams)
    at_S = [c.loss_at(S) for c in adams]
    i_tr = min(range(len(adams)), key=lambda i: at_S[i])
    va = [c.valid_at.get(str(S), math.inf) for c in adams]
    i_va = min(range(len(adams)), key=lambda i: va[i])
    common = dict(adam_valid_at_S=va[i_va], adam_lr_valid=lrs[i_va],
                  adam_best_loss_at_S=at_S[i_tr], adam_lr_train=lrs[i_tr])
    rows, curves = [], {}
    init_loss = adams[0].losses[0]
    for name, make_opt in optimizers.items():
        c = train_curve(task, make_opt, S, seed, eval_every, eval_examples, valid_steps=(S,),
                        name=name)
        L = c.loss_at(S)
        div = c.diverged or not (c.losses[-1] <= init_loss)
        rows.append(SpeedupRow(problem, seed, name, L, speedup(L, env_steps, env_losses, S), div,
                               c.valid_at.get(str(S), math.inf), **common))
        curves[name] = c
        log(f"  {name}: loss@{S}={L:.4g} speedup={rows[-1].speedup:.2f} ({c.seconds:.0f}s)")
    best = adams[i_tr]
    rows.append(SpeedupRow(problem, seed, "adam(tuned)", at_S[i_tr],
                           speedup(at_S[i_tr], env_steps, env_losses, S), False, va[i_tr], **common))
    curves["adam(tuned)"] = best
    curves["adam_envelope"] = Curve("adam_envelope", task.name, seed, list(env_steps),
                                    list(env_losses))
    return rows, curves


def run_suite(problems: Sequence[str], seeds: Sequence[int], optimizers: Dict[str, Callable],
              steps: int, k: int, adam_lrs: Sequence[float], eval_every: int, eval_examples: int,
              cache_dir: Optional[Path] = None, log: Optional[Callable[..., None]] = None):
    """:func:`evaluate_speedup` on every seed of every problem of the held-out suite: the
    speedup rows (dicts) and the running-min training curves, as ``metaopt-eval
    --config-name=suite`` writes them (speedup.csv, curves.csv)."""
    import time

    from metaopt.tasks import make_family
    say = log or (lambda *a: None)
    rows, curve_rows = [], []
    for problem in problems:
        family = make_family("suite", problem=problem)
        for seed in seeds:
            say("%s seed %d", problem, seed)
            t0 = time.perf_counter()
            task = family.sample_seeded(seed)
            r, curves = evaluate_speedup(task, problem, int(seed), optimizers, int(steps), int(k),
                                         list(adam_lrs), int(eval_every), int(eval_examples),
                                         cache_dir, log=say)
            say("%s seed %d: %.0fs", problem, seed, time.perf_counter() - t0)
            rows += [vars(x) for x in r]
            for name, c in curves.items():
                curve_rows += [dict(problem=problem, seed=seed, optimizer=name, step=st,
                                    train_loss=v) for st, v in zip(c.steps, c.running_min())]
    return rows, curve_rows


def _median(v: List[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def summarize_speedup(rows: List[Dict], S: int) -> str:
    """Markdown: per problem the loss at S, speedup and validation loss of each optimizer next to
    tuned Adam's; then per optimizer the IQM / median / min speedup, how many runs reach 1x,
    divergences and how often its validation loss is no worse than tuned Adam's; then, head to
    head, on how many problems the first optimizer (the learned one, when evaluated) is faster
    than each other one (speedup averaged over the seeds of a problem)."""
    lines = [f"| problem | optimizer | train loss @{S} | speedup | valid @{S} | "
             f"adam(tuned) valid @{S} (lr) | diverged |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['problem']} (seed {r['seed']}) | {r['optimizer']} | {r['loss_at_S']:.4g} | "
                     f"{r['speedup']:.2f} | {r['valid_at_S']:.4g} | {r['adam_valid_at_S']:.4g} "
                     f"({r['adam_lr_valid']:g}) | {'yes' if r['diverged'] else 'no'} |")
    # two references for validation loss: the Adam the speedup is measured against (lr tuned on
    # training loss at S) and Adam with its lr tuned, in hindsight, on validation loss at S
    ref_train = {(r["problem"], r["seed"]): r["valid_at_S"] for r in rows
                 if r["optimizer"] == "adam(tuned)"}
    lines += ["", "| optimizer | tasks | IQM speedup | median | min | >= 1x | diverged | "
                  "valid <= adam(lr tuned on train loss) | valid <= adam(lr tuned on valid loss) |",
              "|---|---|---|---|---|---|---|---|---|"]
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    for opt in opts:
        rs = [r for r in rows if r["optimizer"] == opt]
        sp = sorted(r["speedup"] for r in rs)
        ok_t = sum(r["valid_at_S"] <= ref_train[(r["problem"], r["seed"])] for r in rs)
        ok_v = sum(r["valid_at_S"] <= r["adam_valid_at_S"] for r in rs)
        lines.append(f"| {opt} | {len(rs)} | {iqm(sp):.3f} | {_median(sp):.3f} | {sp[0]:.3f} | "
                     f"{sum(v >= 1.0 for v in sp)} | {sum(bool(r['diverged']) for r in rs)} | "
                     f"{ok_t}/{len(rs)} | {ok_v}/{len(rs)} |")
    others = [o for o in opts[1:] if o != "adam(tuned)"]
    if opts and others:
        first = opts[0]
        per = {}   # (optimizer, problem) -> mean speedup over its seeds
        for r in rows:
            per.setdefault((r["optimizer"], r["problem"]), []).append(r["speedup"])
        mean = {k: sum(v) / len(v) for k, v in per.items()}
        probs = list(dict.fromkeys(r["problem"] for r in rows if r["optimizer"] == first))
        lines += ["", f"| {first} vs | problems | {first} faster | tied | {first} slower | "
                      f"speedup ratio (median over problems) |", "|---|---|---|---|---|---|"]
        for o in others:
            both = [p for p in probs if (o, p) in mean]
            a = [mean[(first, p)] for p in both]
            b = [mean[(o, p)] for p in both]
            ratios = [x / y for x, y in zip(a, b) if y > 0]
            ratio = f"{_median(ratios):.2f}" if ratios else "-"
            lines.append(f"| {o} | {len(both)} | {sum(x > y for x, y in zip(a, b))} | "
                         f"{sum(x == y for x, y in zip(a, b))} | "
                         f"{sum(x < y for x, y in zip(a, b))} | {ratio} |")
    return "\n".join(lines)
