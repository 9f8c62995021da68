"""``metaopt-eval``: a trained rule vs tuned SGD/Adam (and any conf/optimizer baseline) on
held-out tasks: fresh seeds of the training family plus families never used in meta-training.

Writes ``results.csv`` (one row per task x optimizer), ``curves.csv`` (validation loss vs step),
``curves.png``; prints a summary table; returns the mean final validation loss of the learned
rule (or of ``optimizer=...`` when one is chosen), so sweepers can minimize it.

    metaopt-eval checkpoint=runs/train/<date>/checkpoints/last
    metaopt-eval -m optimizer=sgd,adam,lookahead,lookbehind,slrla,sgd_hd,adam_hd
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List

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
    from metaopt.rules.io import CheckpointError, load_rule, resolve_rule_path
    try:
        return load_rule(resolve_rule_path(path))
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint={path!r}: {e}") from None


def _torch_opt(cls, lr):
    return lambda named, task: cls([p for _, p in named], lr=lr)


def _check_spec(rule, meta, task, fam_name: str, checkpoint: str, key: str) -> None:
    """A spec-dependent rule (theta per parameter tensor) runs only on the parameter shapes it
    was trained for: anything else is an error naming the family and where it came from."""
    from metaopt.rules.io import spec_mismatch
    from metaopt.types import FlatSpec
    shapes = task.param_shapes()
    if not rule.spec_dependent or not spec_mismatch(meta.get("spec"),
                                                    FlatSpec.from_shapes(shapes), names=True):
        return
    trained = {n: tuple(s) for n, s in (meta.get("spec") or [])}
    here = {n: tuple(s) for n, s in shapes.items()}
    raise ValueError(f"checkpoint={checkpoint!r}: rule {rule.name!r} has one theta per parameter "
                     f"tensor, trained for shapes {trained}, and cannot run on {fam_name} "
                     f"(from {key}; shapes {here}): evaluate it on its training task"
                     + (" and set eval.extra_families=[]" if key == "eval.extra_families" else ""))


def _families(cfg: DictConfig, dtype):
    from metaopt.tasks import make_family
    families = [(cfg.task.family, build_family(cfg.task, cfg.eval.dtype))]
    for name in cfg.eval.extra_families:
        if name in (f for f, _ in families):   # task= already evaluates it: once is enough
            log.info("eval.extra_families: %s is already evaluated (task=%s); skipped", name, name)
            continue
        try:
            families.append((name, make_family(name, dtype=dtype)))
        except ValueError as err:
            raise ValueError(f"eval.extra_families: {err}") from None
    return families


def _baseline(cfg: DictConfig):
    """(name, factory of a learning rate) for ``optimizer=...``, or None."""
    base_cfg = cfg.get("optimizer")
    if base_cfg is None:
        return None
    from hydra.utils import instantiate
    name = HydraConfig.get().runtime.choices.get("optimizer") or "optimizer"

    def factory(lr):
        c = OmegaConf.merge(base_cfg, {"lr": lr})
        return lambda named, t: instantiate(c)([p for _, p in named])
    return name, factory, list(cfg.get("optimizer_lrs") or [base_cfg.lr])


def run_eval(cfg: DictConfig, out_dir: Path) -> float:
    import torch
    from metaopt.meta.evaluate import compare, summarize, train_task, tune_lr, write_csv
    from metaopt.optim import LearnedOptimizer
    from metaopt.viz import plot_eval_curves

    torch.set_num_threads(int(cfg.get("threads") or 2))
    e = cfg.eval
    if e.steps < 1 or e.num_tasks < 1 or e.eval_every < 1:
        raise ValueError(f"eval.steps, eval.num_tasks and eval.eval_every must be >= 1 "
                         f"(got {e.steps}, {e.num_tasks}, {e.eval_every})")
    dtype = DTYPES.get(e.dtype)
    if dtype is None:
        raise ValueError(f"Invalid eval.dtype: {e.dtype!r}")
    for b in e.baselines:
        if b not in ("sgd", "adam"):
            raise ValueError(f"Invalid eval.baselines entry: {b!r} (use sgd, adam; other "
                             "optimizers via optimizer=<name>)")
    rule, theta, meta = _resolve_checkpoint(cfg.checkpoint) if cfg.checkpoint else (None, None, None)
    families = _families(cfg, dtype)
    baseline = _baseline(cfg)
    seeds = [e.seed + i for i in range(e.num_tasks)]
    if rule is not None:   # fail before any training, not after the first families
        for j, (fam_name, family) in enumerate(families):
            for seed in seeds:
                _check_spec(rule, meta, family.sample_seeded(seed), fam_name, cfg.checkpoint,
                            "task=" if j == 0 else "eval.extra_families")
    kw = dict(eval_every=e.eval_every, dtype=dtype)
    tuned = {"sgd": (torch.optim.SGD, e.sgd_lrs), "adam": (torch.optim.Adam, e.adam_lrs)}

    def runs(task, seed):
        out = []
        if rule is not None:
            out.append(train_task(task, lambda named, t: LearnedOptimizer(
                named, rule=rule, theta={k: v.to(dtype) for k, v in theta.items()},
                model=t.module), e.steps, seed, name="learned", **kw))
        out.append(train_task(task, _torch_opt(torch.optim.Adam, e.reference_adam_lr), e.steps,
                              seed, name=f"adam@{e.reference_adam_lr:g}", lr=e.reference_adam_lr, **kw))
        for b in e.baselines:
            cls, grid = tuned[b]
            out.append(tune_lr(task, lambda lr, c=cls: _torch_opt(c, lr), grid, e.steps, seed,
                               f"{b}(tuned)", **kw))
        if baseline is not None:
            name, factory, grid = baseline
            out.append(tune_lr(task, factory, grid, e.steps, seed, f"{name}(tuned)", **kw))
        return out

    results, curves = compare(families, seeds, runs)
    write_csv(out_dir / "results.csv", results)
    write_csv(out_dir / "curves.csv", curves)
    table = summarize(results)
    print(table)
    (out_dir / "summary.md").write_text(table + "\n")
    plot_eval_curves(curves, out_dir / "curves.png")
    target = "learned" if baseline is None else f"{baseline[0]}(tuned)"
    vals = [r["final_valid"] for r in results if r["optimizer"] == target]
    return sum(vals) / len(vals) if vals else math.inf


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
    import torch
    from metaopt.meta.evaluate import write_csv
    from metaopt.meta.peers import make_peers
    from metaopt.meta.speedup import iqm, run_suite, summarize_speedup
    from metaopt.optim import LearnedOptimizer
    from metaopt.viz.plots import plot_speedups, plot_suite_curves

    torch.set_num_threads(int(cfg.get("threads") or 1))
    sp = cfg.speedup
    if sp.steps < 1 or sp.k < 1 or sp.eval_every < 1 or not sp.seeds or sp.problems == []:
        raise ValueError("speedup.steps, speedup.k, speedup.eval_every must be >= 1 and "
                         "speedup.seeds, speedup.problems non-empty")
    problems = _suite_problems(sp)
    optimizers = {}
    if cfg.get("checkpoint"):
        from metaopt.rules.io import resolve_rule_path
        loaded = _resolve_checkpoint(cfg.checkpoint)   # read once, for every task
        where = str(resolve_rule_path(cfg.checkpoint))
        optimizers["learned"] = lambda named: LearnedOptimizer.from_loaded(named, *loaded,
                                                                           where=where)
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
    rows, curve_rows = run_suite(problems, sp.seeds, optimizers, sp.steps, sp.k, sp.adam_lrs,
                                 sp.eval_every, sp.eval_examples,
                                 Path(sp.cache_dir) if sp.cache_dir else None, log=log.info)
    write_csv(out_dir / "speedup.csv", rows)
    write_csv(out_dir / "curves.csv", curve_rows)
    table = summarize_speedup(rows, int(sp.steps))
    print(table)
    (out_dir / "summary.md").write_text(table + "\n")
    plot_speedups([r for r in rows if r["optimizer"] != "adam(tuned)"], out_dir / "speedup.png",
                  title=f"held-out suite ({sp.set} half), S = {sp.steps} steps")
    plot_suite_curves(curve_rows, int(sp.steps), out_dir / "curves.png")
    return iqm([r["speedup"] for r in rows if r["optimizer"] == next(iter(optimizers))])


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
