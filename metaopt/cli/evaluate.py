"""``metaopt-eval``: a trained rule vs tuned SGD/Adam (and any conf/optimizer baseline) on
held-out tasks: fresh seeds of the training family plus families never used in meta-training.

Writes ``results.csv`` (one row per task x optimizer), ``curves.csv`` (validation loss vs step),
``curves.png``; prints a summary table; returns the mean final validation loss of the learned
rule (or of ``optimizer=...`` when one is chosen), so sweepers can minimize it.

    metaopt-eval checkpoint=runs/train/<date>/checkpoints/last
    metaopt-eval -m optimizer=sgd,adam,lookahead,lookbehind,slrla,sgd_hd,adam_hd
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Dict, List

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metaopt.cli.common import (check_known_keys, config_dir, one_line_errors,
                                primary_config_keys, register_resolvers)
from metaopt.cli.config import DTYPES, build_family, register_configs

log = logging.getLogger("metaopt.eval")
register_configs()
register_resolvers()


def _resolve_checkpoint(path: str):
    from metaopt.meta.checkpoint import CheckpointError, load_rule, resolve_rule_path
    try:
        return load_rule(resolve_rule_path(path))
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint={path!r}: {e}") from None


def _torch_opt(cls, lr):
    return lambda named, task: cls([p for _, p in named], lr=lr)


def _spec_matches(rule, meta, task) -> bool:
    if not rule.spec_dependent:
        return True
    return [list(x) for x in meta.get("spec") or []] == [[n, list(s)] for n, s in task.param_shapes().items()]


def _check_spec(rule, meta, task, fam_name: str, checkpoint: str, key: str) -> None:
    """A spec-dependent rule (theta per parameter tensor) runs only on the parameter shapes it
    was trained for: anything else is an error naming the family and where it came from."""
    if _spec_matches(rule, meta, task):
        return
    trained = {n: tuple(s) for n, s in (meta.get("spec") or [])}
    here = {n: tuple(s) for n, s in task.param_shapes().items()}
    raise ValueError(f"checkpoint={checkpoint!r}: rule {rule.name!r} has one theta per parameter "
                     f"tensor, trained for shapes {trained}, and cannot run on {fam_name} "
                     f"(from {key}; shapes {here}): evaluate it on its training task"
                     + (" and set eval.extra_families=[]" if key == "eval.extra_families" else ""))


def run_eval(cfg: DictConfig, out_dir: Path) -> float:
    import torch
    from metaopt.meta.evaluate import train_task, tune_lr
    from metaopt.optim import LearnedOptimizer

    torch.set_num_threads(int(cfg.get("threads") or 2))
    e = cfg.eval
    if e.steps < 1 or e.num_tasks < 1 or e.eval_every < 1:
        raise ValueError(f"eval.steps, eval.num_tasks and eval.eval_every must be >= 1 "
                         f"(got {e.steps}, {e.num_tasks}, {e.eval_every})")
    dtype = DTYPES.get(e.dtype)
    if dtype is None:
        raise ValueError(f"Invalid eval.dtype: {e.dtype!r}")
    rule, theta, meta = _resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else (None, None, None)
    families = [(cfg.task.family, build_family(cfg.task, e.dtype))]
    from metaopt.tasks import make_family
    for name in e.extra_families:
        if name in (f for f, _ in families):   # task= already evaluates it: once is enough
            log.info("eval.extra_families: %s is already evaluated (task=%s); skipped", name, name)
            continue
        try:
            families.append((name, make_family(name, dtype=dtype)))
        except ValueError as err:
            raise ValueError(f"eval.extra_families: {err}") from None
    baseline_cfg = cfg.get("optimizer")
    if baseline_cfg is not None:
        from hydra.utils import instantiate
        base_name = HydraConfig.get().runtime.choices.get("optimizer") or "optimizer"

    if rule is not None:   # fail before any training, not after the first families
        for j, (fam_name, family) in enumerate(families):
            for i in range(e.num_tasks):
                _check_spec(rule, meta, family.sample_seeded(e.seed + i), fam_name,
                            cfg.checkpoint, "task=" if j == 0 else "eval.extra_families")

    results, curves = [], []
    kw = dict(eval_every=e.eval_every, dtype=dtype)
    for fam_name, family in families:
        for i in range(e.num_tasks):
            seed = e.seed + i
            task = family.sample_seeded(seed)
            runs = []
            if rule is not None:
                runs.append(train_task(task, lambda named, t: LearnedOptimizer(
                    named, rule=rule, theta={k: v.to(dtype) for k, v in theta.items()},
                    model=t.module), e.steps, seed, name="learned", **kw))
            runs.append(train_task(task, _torch_opt(torch.optim.Adam, e.reference_adam_lr), e.steps,
                                   seed, name=f"adam@{e.reference_adam_lr:g}", lr=e.reference_adam_lr, **kw))
            for b in e.baselines:
                if b == "sgd":
                    runs.append(tune_lr(task, lambda lr: _torch_opt(torch.optim.SGD, lr), e.sgd_lrs,
                                        e.steps, seed, "sgd(tuned)", **kw))
                elif b == "adam":
                    runs.append(tune_lr(task, lambda lr: _torch_opt(torch.optim.Adam, lr), e.adam_lrs,
                                        e.steps, seed, "adam(tuned)", **kw))
                else:
                    raise ValueError(f"Invalid eval.baselines entry: {b!r} (use sgd, adam; other "
                                     "optimizers via optimizer=<name>)")
            if baseline_cfg is not None:
                grid = list(cfg.get("optimizer_lrs") or [baseline_cfg.lr])

                def factory(lr, _cfg=baseline_cfg):
                    c = OmegaConf.merge(_cfg, {"lr": lr})
                    return lambda named, t: instantiate(c)([p for _, p in named])
                runs.append(tune_lr(task, factory, grid, e.steps, seed, f"{base_name}(tuned)", **kw))
            for r in runs:
                results.append(dict(family=fam_name, task_seed=seed, structure=str(task.structure),
                                    optimizer=r.optimizer, lr=r.lr, final_valid=r.final_valid,
                                    final_test=r.final_test, diverged=r.diverged))
                curves += [dict(family=fam_name, task_seed=seed, optimizer=r.optimizer, step=s,
                                valid_loss=v) for s, v in zip(r.steps, r.valid_losses)]
    _write_csv(out_dir / "results.csv", results)
    _write_csv(out_dir / "curves.csv", curves)
    table = summarize(results)
    print(table)
    (out_dir / "summary.md").write_text(table + "\n")
    from metaopt.viz import plot_eval_curves
    plot_eval_curves(curves, out_dir / "curves.png")
    target = "learned" if baseline_cfg is None else f"{base_name}(tuned)"
    vals = [r["final_valid"] for r in results if r["optimizer"] == target]
    return sum(vals) / len(vals) if vals else math.inf


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


def _write_csv(path: Path, rows: List[Dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _suite_problems(sp) -> List[str]:
    """speedup.problems (all of speedup.set when null), each checked to be in speedup.set: the
    final half runs only when asked for by name (speedup.set=final)."""
    from metaopt.tasks.suite import suite_problems, suite_set_of
    try:
        names = list(suite_problems(sp.set))
    except ValueError as err:
        raise ValueError(f"speedup.set: {err}") from None
    if sp.problems is None:
        return names
    for p in sp.problems:
        try:
            other = suite_set_of(p)
        except ValueError as err:
            raise ValueError(f"speedup.problems: {err}") from None
        if other != sp.set:
            raise ValueError(f"speedup.problems: {p!r} is in the {other} half, not in "
                             f"speedup.set={sp.set} (set speedup.set={other} to run it)")
    return list(sp.problems)


def run_speedup(cfg: DictConfig, out_dir: Path) -> float:
    """The held-out suite (``metaopt-eval --config-name=suite``): speedup over lr-tuned Adam
    (:mod:`metaopt.meta.speedup`) of the rule in ``checkpoint``, of ``optimizer=...`` if given,
    and of the untuned peers in ``speedup.peers`` (:mod:`metaopt.meta.peers`), on the problems
    of ``speedup.set`` (``design`` or ``final``, see :mod:`metaopt.tasks.suite`). Writes
    speedup.csv, curves.csv, summary.md, speedup.png, curves.png; returns the IQM speedup of
    the first optimizer (the learned rule when ``checkpoint`` is set)."""
    import time

    import torch
    from metaopt.meta.peers import make_peers
    from metaopt.meta.speedup import evaluate_speedup, iqm
    from metaopt.optim import LearnedOptimizer
    from metaopt.tasks import make_family

    torch.set_num_threads(int(cfg.get("threads") or 1))
    sp = cfg.speedup
    if sp.steps < 1 or sp.k < 1 or sp.eval_every < 1 or not sp.seeds or sp.problems == []:
        raise ValueError("speedup.steps, speedup.k, speedup.eval_every must be >= 1 and "
                         "speedup.seeds, speedup.problems non-empty")
    problems = _suite_problems(sp)
    optimizers = {}
    if cfg.get("checkpoint"):
        rule, theta, _ = _resolve_checkpoint(cfg.checkpoint)
        path = cfg.checkpoint

        def make_learned(named, _path=path):
            return LearnedOptimizer.from_pretrained(named, _path)
        optimizers["learned"] = make_learned
    baseline_cfg = cfg.get("optimizer")
    if baseline_cfg is not None:
        from hydra.utils import instantiate
        base_name = HydraConfig.get().runtime.choices.get("optimizer") or "optimizer"
        optimizers[base_name] = lambda named, _c=baseline_cfg: instantiate(_c)([p for _, p in named])
    try:
        peers = make_peers(list(sp.peers or []), log=log.info)
    except ValueError as err:
        raise ValueError(f"speedup.peers: {err}") from None
    for name, factory in peers.items():
        if name in optimizers:
            raise ValueError(f"speedup.peers: {name!r} is also the name of optimizer=...")
        optimizers[name] = factory
    if not optimizers:
        raise ValueError("nothing to evaluate: set checkpoint=..., optimizer=... or speedup.peers")
    cache = Path(sp.cache_dir) if sp.cache_dir else None
    rows, curve_rows = [], []
    for problem in problems:
        family = make_family("suite", problem=problem)
        for seed in sp.seeds:
            log.info("%s seed %d", problem, seed)
            t0 = time.perf_counter()
            task = family.sample_seeded(seed)
            r, curves = evaluate_speedup(task, problem, int(seed), optimizers, int(sp.steps),
                                         int(sp.k), list(sp.adam_lrs), int(sp.eval_every),
                                         int(sp.eval_examples), cache, log=log.info)
            log.info("%s seed %d: %.0fs", problem, seed, time.perf_counter() - t0)
            rows += [vars(x) for x in r]
            for name, c in curves.items():
                curve_rows += [dict(problem=problem, seed=seed, optimizer=name, step=st,
                                    train_loss=v) for st, v in zip(c.steps, c.running_min())]
    _write_csv(out_dir / "speedup.csv", rows)
    _write_csv(out_dir / "curves.csv", curve_rows)
    table = summarize_speedup(rows, int(sp.steps))
    print(table)
    (out_dir / "summary.md").write_text(table + "\n")
    from metaopt.viz.plots import plot_speedups
    plot_speedups([r for r in rows if r["optimizer"] != "adam(tuned)"], out_dir / "speedup.png",
                  title=f"held-out suite ({sp.set} half), S = {sp.steps} steps")
    _plot_suite_curves(curve_rows, int(sp.steps), out_dir / "curves.png")
    vals = [r["speedup"] for r in rows if r["optimizer"] == next(iter(optimizers))]
    return iqm(vals)


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
    from metaopt.meta.speedup import iqm
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


def _grid(n: int):
    """(rows, cols) for n panels with as few empty cells as possible (none when n <= 5)."""
    if n <= 5:
        return 1, max(n, 1)
    cols = min((5, 4, 3), key=lambda c: ((-n) % c, -c))
    return -(-n // cols), cols


def _plot_suite_curves(curve_rows: List[Dict], S: int, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from metaopt.viz.plots import figure_legend, plot_loss_curves
    keys = list(dict.fromkeys((r["problem"], r["seed"]) for r in curve_rows))
    nrows, cols = _grid(len(keys))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    seeds = {s for _, s in keys}
    for ax, (prob, seed) in zip(axes.flat, keys):
        sel = [r for r in curve_rows if r["problem"] == prob and r["seed"] == seed]
        curves, steps = {}, None
        for opt in dict.fromkeys(r["optimizer"] for r in sel):
            pts = [(r["step"], r["train_loss"]) for r in sel if r["optimizer"] == opt and r["step"] <= S]
            st = [p[0] for p in pts]
            steps = st if steps is None or len(st) < len(steps) else steps
            curves[opt] = [p[1] for p in pts]
        n = len(steps)
        plot_loss_curves({k: np.array(v[:n], dtype=float) for k, v in curves.items()}, steps,
                         ax=ax, ylabel="train loss (running min)", legend=False,
                         title=prob if len(seeds) == 1 else f"{prob} (seed {seed})")
        for line in ax.get_lines():   # tuned Adam lies on the envelope: dashed, on top
            if line.get_label().startswith("adam(tuned)"):
                line.set_linestyle("--")
                line.set_zorder(5)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    for ax in axes[:, 1:].flat:
        ax.set_ylabel("")
    figure_legend(fig, axes.flat[0])
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@hydra.main(config_path=config_dir(), config_name="eval", version_base=None)
@one_line_errors
def main(cfg: DictConfig) -> float:
    out = Path(HydraConfig.get().runtime.output_dir)
    check_known_keys(cfg, primary_config_keys())
    if cfg.get("speedup") is not None:
        return run_speedup(cfg, out)
    return run_eval(cfg, out)


if __name__ == "__main__":
    main()
