"""Figures. Each function takes plain data (arrays, rows, a :class:`StepLog`, a directory) and
returns a matplotlib ``Figure`` (or draws on ``ax``); with ``path=`` it also writes a PNG there
and closes the figure (so CLIs and loops don't accumulate open figures).

No backend is chosen here: in a notebook figures show inline, in a script or test without a
display matplotlib falls back to Agg by itself.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np

from metaopt.viz.probe import ResponseSurface
from metaopt.viz.record import QUANTILES, StepLog
from metaopt.viz.sweep import SweepRun, load_sweep

PathLike = Union[str, Path]


def _finish(fig, path: Optional[PathLike]):
    fig.tight_layout()
    if path is not None:
        # "tight" keeps the legends that sit outside the axes (they never cover data)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


def legend_outside(ax, **kw):
    """The axes' legend to the right of its data, outside the axes, so it covers no curve."""
    if not ax.get_legend_handles_labels()[0]:
        return None
    kw = {"fontsize": 8, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0),
          "borderaxespad": 0.0, "frameon": False, **kw}
    return ax.legend(**kw)


def figure_legend(fig, ax, ncol: Optional[int] = None):
    """One legend for all panels (from ``ax``'s lines), centered below them."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=ncol or min(len(labels), 4), frameon=False, fontsize=9)


def _band(ax, steps, arr, label, band: str = "minmax", lw: float = 1.5, color=None):
    """Mean over rows of ``arr`` [seeds, steps] (NaN = missing, e.g. a diverged run) and a band."""
    arr = np.asarray(arr, dtype=float)
    if arr.ndim == 1:
        arr = arr[None]
    with np.errstate(all="ignore"), _quiet():
        mean = np.nanmean(arr, axis=0)
        if band == "std":
            s = np.nanstd(arr, axis=0)
            lo, hi = mean - s, mean + s
        elif band == "minmax":
            lo, hi = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
        else:
            raise ValueError(f"Invalid band: {band!r} (use 'minmax' or 'std')")
    (line,) = ax.plot(steps, mean, label=f"{label} (n={arr.shape[0]})" if arr.shape[0] > 1 else label,
                      lw=lw, color=color)
    if arr.shape[0] > 1:
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    return line


class _quiet:
    """Silence numpy's all-NaN-slice warnings (missing points are expected)."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# -- (3) loss curves over seeds ------------------------------------------------------------------
def plot_loss_curves(curves: Mapping[str, np.ndarray], steps: Optional[Sequence[float]] = None,
                     path: Optional[PathLike] = None, ax=None, ylabel: str = "validation loss",
                     xlabel: str = "step", logy: bool = True, band: str = "minmax",
                     title: Optional[str] = None, highlight: Sequence[str] = ("learned",),
                     legend: bool = True):
    """``curves``: optimizer name -> array [seeds, steps] (NaN where a run stopped, e.g.
    diverged). Mean line, shaded min..max over seeds (``band="std"``: +-1 std). The legend sits
    outside the axes (``legend=False``: none, e.g. for one figure legend over several panels)."""
    if not curves:
        raise ValueError("curves: empty (need at least one optimizer)")
    arrays = {k: np.atleast_2d(np.asarray(v, dtype=float)) for k, v in curves.items()}
    n = {a.shape[1] for a in arrays.values()}
    if len(n) != 1:
        raise ValueError(f"curves: all arrays need the same number of steps, got {sorted(n)}")
    n = n.pop()
    steps = np.arange(n) if steps is None else np.asarray(steps, dtype=float)
    if len(steps) != n:
        raise ValueError(f"steps: {len(steps)} values for curves of length {n}")
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(6, 3.8))
    for name, arr in arrays.items():
        _band(ax, steps, arr, name, band, lw=2.2 if name in highlight else 1.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if legend:
        legend_outside(ax)
    # on a caller's axes, layout is the caller's business (one tight_layout per panel is slow)
    return _finish(ax.figure, path) if own or path is not None else ax.figure


def curves_from_rows(rows: Iterable[Mapping], family: Optional[str] = None, value: str = "valid_loss",
                     ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Rows like metaopt-eval's curves.csv (family, task_seed, optimizer, step, valid_loss) ->
    ``(steps, {optimizer: [seeds, steps]})`` for :func:`plot_loss_curves` (NaN-padded)."""
    by = defaultdict(lambda: defaultdict(dict))
    all_steps = set()
    for r in rows:
        if family is not None and r["family"] != family:
            continue
        s = int(float(r["step"]))
        by[r["optimizer"]][r["task_seed"]][s] = float(r[value])
        all_steps.add(s)
    if not by:
        raise ValueError(f"rows: no curves{f' for family {family!r}' if family else ''}")
    steps = np.array(sorted(all_steps))
    out = {}
    for opt, seeds in by.items():
        out[opt] = np.array([[d.get(s, np.nan) for s in steps] for d in seeds.values()])
    return steps, out


def plot_eval_curves(curves: List[Dict], path) -> Path:
    """metaopt-eval's curves rows: one panel per task family, validation loss vs step per
    optimizer, mean over held-out tasks with the min..max band shaded (log y)."""
    fams = list(dict.fromkeys(r["family"] for r in curves))
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.8), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        steps, arrays = curves_from_rows(curves, fam)
        plot_loss_curves(arrays, steps, ax=ax, title=f"held-out {fam}", legend=False)
    figure_legend(fig, axes[0][0])
    _finish(fig, path)
    return Path(path)


# -- (3b) speedup over tuned Adam ------------------------------------------------------------------
def plot_speedups(rows: Iterable, path: Optional[PathLike] = None, task_key: str = "problem",
                  optimizer_key: str = "optimizer", value_key: str = "speedup",
                  reference: float = 1.0, title: Optional[str] = None):
    """Speedup per task (one group of bars per task, one bar per optimizer, log x), with each
    optimizer's interquartile mean (IQM) over tasks in the legend and a line at ``reference``
    (1 = as fast as the reference). Missing or non-finite values (a diverged run) are drawn as
    an ``x`` at the left edge. ``rows``: dicts or dataclasses (e.g. metaopt-eval's speedup rows)
    with the columns ``task_key``, ``optimizer_key``, ``value_key``; when a task appears with
    several ``seed`` values, each (task, seed) gets its own group."""
    rows = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]
    if not rows:
        raise ValueError("rows: empty")
    for k in (task_key, optimizer_key, value_key):
        if k not in rows[0]:
            raise ValueError(f"rows: no column {k!r} (have {', '.join(rows[0])})")
    keys = [(str(r[task_key]), str(r[optimizer_key])) for r in rows]
    if len(set(keys)) < len(keys) and all("seed" in r for r in rows):  # several seeds per task
        for r in rows:
            r[task_key] = f"{r[task_key]} (seed {r['seed']})"
    tasks = list(dict.fromkeys(str(r[task_key]) for r in rows))
    opts = list(dict.fromkeys(str(r[optimizer_key]) for r in rows))
    val = {(str(r[task_key]), str(r[optimizer_key])): _float(r[value_key]) for r in rows}
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * len(tasks) * max(1, len(opts)) ** 0.5 + 1.0))
    h = 0.8 / len(opts)
    finite = [v for v in val.values() if math.isfinite(v) and v > 0]
    left = min(finite + [reference]) / 2
    for k, opt in enumerate(opts):
        ys = np.arange(len(tasks)) + (k - (len(opts) - 1) / 2) * h
        vs = np.array([val.get((t, opt), np.nan) for t in tasks])
        ok = np.isfinite(vs) & (vs > 0)
        iqm_v = iqm(vs[ok]) if ok.any() else float("nan")
        bars = ax.barh(ys[ok], vs[ok] - left, left=left, height=h * 0.9,
                       label=f"{opt} (IQM {iqm_v:.2f})")
        if (~ok).any():
            ax.plot(np.full((~ok).sum(), left), ys[~ok], "x", color=bars.patches[0].get_facecolor()
                    if bars.patches else "k", ms=8)
    ax.axvline(reference, color="k", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over tuned Adam (steps, >1 = faster)")
    ax.set_ylabel("task")
    if title:
        ax.set_title(title)
    legend_outside(ax)
    return _finish(fig, path)


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def iqm(values) -> float:
    """Interquartile mean: the mean of the values between the 25th and 75th percentiles."""
    v = np.sort(np.asarray(values, dtype=float))
    if v.size == 0:
        return float("nan")
    cut = int(0.25 * v.size)  # drop int(n/4) from each end (as metaopt.meta.speedup.iqm)
    return float(v[cut:v.size - cut].mean())


# -- (1) learned schedules and effective step sizes -------------------------------------------------
def plot_lr_schedule(log_lr, names: Optional[Sequence[str]] = None, ax=None, title=None,
                     path: Optional[PathLike] = None):
    """A LayerwiseLR schedule: ``theta["log_lr"]`` of shape ``(num_steps, num_tensors)`` -> one line per layer."""
    import torch
    lr = torch.as_tensor(log_lr).detach().exp().cpu().numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    for j in range(lr.shape[1]):
        ax.plot(np.arange(lr.shape[0]), lr[:, j], marker=".", label=names[j] if names else f"tensor {j}")
    ax.set_xlabel("inner step")
    ax.set_ylabel("learned learning rate")
    ax.set_yscale("log")
    ax.set_title(title or "learned per-layer learning-rate schedule")
    legend_outside(ax)
    if path is not None:
        _finish(ax.figure, path)
    return ax


def plot_effective_step_sizes(log: StepLog, path: Optional[PathLike] = None,
                              tensors: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """Two panels, one line per parameter tensor: median |update| / |grad| (the effective
    learning rate) and median |update| / |param| (the relative step), vs optimizer step."""
    if len(log) == 0:
        raise ValueError("log: no recorded steps")
    idx = _select(log.names, tensors)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, arr, lab in ((axes[0], log.grad_ratio, "median |update| / |grad|"),
                         (axes[1], log.param_ratio, "median |update| / |param|")):
        for j in idx:
            ax.plot(log.steps, arr[:, j], label=log.names[j], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(lab)
        if np.nanmax(np.where(np.isfinite(arr[:, idx]), arr[:, idx], np.nan), initial=0) > 0:
            ax.set_yscale("log")
    axes[0].set_title("effective learning rate per tensor")
    axes[1].set_title("relative step size per tensor")
    legend_outside(axes[1])
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def _select(names: Sequence[str], tensors: Optional[Sequence[str]], max_n: Optional[int] = None):
    if tensors is None:
        idx = list(range(len(names)))
    else:
        bad = [t for t in tensors if t not in names]
        if bad:
            raise ValueError(f"tensors: unknown {bad[0]!r} (have {', '.join(names)})")
        idx = [names.index(t) for t in tensors]
    return idx[:max_n] if max_n else idx


# -- (2) update-magnitude distributions -------------------------------------------------------------
def plot_update_distributions(log: StepLog, path: Optional[PathLike] = None,
                              tensors: Optional[Sequence[str]] = None, max_tensors: int = 6):
    """One panel per tensor: the distribution of log10 |update| over coordinates (colour: the
    fraction of coordinates per bin) against the step, with the median and the 5-95% quantiles."""
    if len(log) == 0:
        raise ValueError("log: no recorded steps")
    idx = _select(log.names, tensors, max_tensors)
    ncol = min(3, len(idx))
    nrow = -(-len(idx) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    e = log.bin_edges
    s0, s1 = log.steps[0] - 0.5, log.steps[-1] + 0.5
    qi = {q: i for i, q in enumerate(QUANTILES)}
    for ax, j in zip(axes.flat, idx):
        im = ax.imshow(log.hist[:, j].T, origin="lower", aspect="auto", extent=(s0, s1, e[0], e[-1]),
                       cmap="viridis", interpolation="nearest")
        with np.errstate(divide="ignore"):
            lq = np.log10(log.quantiles[:, j])
        ax.plot(log.steps, lq[:, qi[0.5]], color="w", lw=1.2, label="median")
        ax.plot(log.steps, lq[:, qi[0.05]], color="w", lw=0.7, ls=":", label="5%, 95%")
        ax.plot(log.steps, lq[:, qi[0.95]], color="w", lw=0.7, ls=":")
        ax.set_ylim(e[0], e[-1])
        ax.set_title(log.names[j], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("log10 |update|")
        fig.colorbar(im, ax=ax, label="fraction of coordinates")
    for ax in list(axes.flat)[len(idx):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    return _finish(fig, path)


# -- (4) sweep comparison ---------------------------------------------------------------------------
def plot_sweep(sweep: Union[PathLike, Sequence[SweepRun]], path: Optional[PathLike] = None,
               x: str = "wall_time", heldout: Optional[Mapping[str, Tuple[float, float]]] = None,
               title: Optional[str] = None):
    """Compare the runs of a ``metaopt-train -m`` multirun (schemes, local vs global losses, rule
    sizes -- whatever the overrides vary): meta-loss vs ``x`` (``wall_time``, ``outer_step`` or
    ``inner_steps``) per run, and a bar per run of its final meta-loss (mean of the last 10%).
    ``heldout``: run label -> (learned, adam) held-out validation losses, drawn as a third panel
    (default: read from the sweep's report.csv when metaopt-report has written one)."""
    runs = load_sweep(sweep) if isinstance(sweep, (str, Path)) else list(sweep)
    if not runs:
        raise ValueError(f"sweep: no runs (no metrics.csv) under {sweep}")
    if x not in ("wall_time", "outer_step", "inner_steps"):
        raise ValueError(f"Invalid x: {x!r} (use wall_time, outer_step or inner_steps)")
    if heldout is None and isinstance(sweep, (str, Path)) and (Path(sweep) / "report.csv").exists():
        heldout = read_heldout(Path(sweep) / "report.csv")
    heldout = {k: v for k, v in (heldout or {}).items() if any(r.label == k for r in runs)}
    npan = 3 if heldout else 2
    fig, axes = plt.subplots(1, npan, figsize=(5.2 * npan, 4))
    xlabels = {"wall_time": "wall time (s)", "outer_step": "outer step",
               "inner_steps": "inner steps consumed (all slots)"}
    for r in runs:
        axes[0].plot(r.column(x), r.column("meta_loss"), label=r.label, lw=1.3)
    axes[0].set_xlabel(xlabels[x])
    axes[0].set_ylabel("meta-loss")
    axes[0].set_title("meta-training")
    pos = np.arange(len(runs))
    axes[1].bar(pos, [r.final_meta_loss for r in runs], color=[f"C{i}" for i in range(len(runs))])
    axes[1].set_xticks(pos, [r.label for r in runs], rotation=20, fontsize=7, ha="right")
    axes[1].set_ylabel("final meta-loss (last 10%)")
    axes[1].set_xlabel("run")
    if heldout:
        plot_heldout({r.label: heldout[r.label] for r in runs if r.label in heldout}, ax=axes[2])
    figure_legend(fig, axes[0], ncol=min(len(runs), 3))
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_heldout(heldout: Mapping[str, Tuple[float, float]], path: Optional[PathLike] = None, ax=None):
    """Run label -> (learned rule, Adam(1e-3)) held-out validation loss: a bar per run for the
    learned rule, a black tick for Adam on the same tasks."""
    if not heldout:
        raise ValueError("heldout: empty")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    labels = list(heldout)
    p = np.arange(len(labels))
    ax.bar(p, [heldout[k][0] for k in labels], label="learned rule")
    ax.plot(p, [heldout[k][1] for k in labels], "k_", ms=25, mew=2, label="Adam(1e-3), same tasks")
    ax.set_xticks(p, labels, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("held-out validation loss")
    ax.set_xlabel("run")
    legend_outside(ax)
    return _finish(ax.figure, path)


def read_heldout(report_csv: PathLike) -> Dict[str, Tuple[float, float]]:
    """metaopt-report's report.csv -> run label -> (heldout_learned, heldout_adam_1e-3)."""
    out = {}
    with open(report_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("heldout_learned") not in (None, ""):
                out[r["run"]] = (_float(r["heldout_learned"]), _float(r.get("heldout_adam_1e-3")))
    return out


def plot_meta_training(metrics_csv, ax=None, x: str = "outer_step", label=None):
    """Meta-loss from a run's metrics.csv against outer steps, wall time or inner steps."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    xs = [float(r[x]) for r in rows]
    ys = [float(r["meta_loss"]) for r in rows]
    ax.plot(xs, ys, label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel("meta-loss")
    return ax


# -- (5) response surface -------------------------------------------------------------------------
def plot_response_surface(surface: ResponseSurface, path: Optional[PathLike] = None,
                          title: Optional[str] = None):
    """One panel per probed time step: the update vs the gradient, one line per gradient
    history ("momentum": the constant gradient of all earlier steps)."""
    s = surface
    fig, axes = plt.subplots(1, len(s.steps), figsize=(3.8 * len(s.steps), 3.6), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("coolwarm")
    for ax, si, t in zip(axes[0], range(len(s.steps)), s.steps):
        for mi, m in enumerate(s.momenta):
            c = cmap(mi / max(1, len(s.momenta) - 1))
            ax.plot(s.grads, s.updates[si, mi], color=c, label=f"history {m:+.3g}")
        ax.axhline(0, color="0.7", lw=0.6)
        ax.axvline(0, color="0.7", lw=0.6)
        ax.set_title(f"after {int(t)} step{'s' if t != 1 else ''}", fontsize=9)
        ax.set_xlabel("gradient")
    axes[0][0].set_ylabel("update (change of the parameter)")
    legend_outside(axes[0][-1])
    fig.suptitle(title or f"response of rule {s.rule!r}")
    return _finish(fig, path)


def panel_grid(n: int) -> Tuple[int, int]:
    """(rows, cols) for n panels with as few empty cells as possible (none when n <= 5)."""
    if n <= 5:
        return 1, max(n, 1)
    cols = min((5, 4, 3), key=lambda c: ((-n) % c, -c))
    return -(-n // cols), cols


def plot_suite_curves(curve_rows: List[Dict], S: int, path: Path) -> None:
    """One panel per (problem, seed) of the held-out suite: each optimizer's running-min
    training loss up to step ``S``, tuned Adam dashed on top; one legend for the figure."""
    keys = list(dict.fromkeys((r["problem"], r["seed"]) for r in curve_rows))
    nrows, cols = panel_grid(len(keys))
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
