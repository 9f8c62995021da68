"""Record what an optimizer's steps do to each parameter tensor, without touching its code.

    rec = StepRecorder(opt, model=model)          # any torch.optim.Optimizer, LearnedOptimizer too
    with rec:
        for x, y in data:
            opt.step(closure)
    log = rec.log()                               # per-step, per-tensor arrays (numpy)
    plot_effective_step_sizes(log); plot_update_distributions(log)

It uses ``torch.optim.Optimizer``'s own step hooks (``register_step_pre_hook`` /
``register_step_post_hook``): the pre-hook copies the parameters, the post-hook subtracts, so the
update is whatever the step actually wrote (lr, schedules, weight decay and all). The gradient
is ``p.grad`` after the step -- the one the step used, also when a closure computed it.

Per tensor and recorded step it keeps

* ``grad_ratio``: median over coordinates of ``|update| / |grad|`` (coordinates with grad != 0),
  the effective per-coordinate learning rate (SGD(lr) gives exactly lr);
* ``param_ratio``: median of ``|update| / |param|`` (param before the step, != 0), the relative
  step size;
* ``quantiles``: quantiles ``QUANTILES`` of ``|update|``;
* ``hist``: the fraction of coordinates whose ``log10 |update|`` falls in each of ``bin_edges``'s
  bins (exact zeros and anything below the first edge count in the first bin, anything above the
  last in the last bin).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["QUANTILES", "StepLog", "StepRecorder"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_BIN_EDGES = np.linspace(-9.0, 1.0, 41)  # log10 |update|


@dataclass
class StepLog:
    """Arrays indexed ``[recorded step, tensor (, quantile | bin)]``."""

    names: List[str]
    steps: np.ndarray          # [T] 1-based index of the optimizer step
    grad_ratio: np.ndarray     # [T, L]
    param_ratio: np.ndarray    # [T, L]
    quantiles: np.ndarray      # [T, L, len(QUANTILES)] of |update|
    hist: np.ndarray           # [T, L, len(bin_edges) - 1] fractions
    bin_edges: np.ndarray      # log10 |update|

    def __len__(self) -> int:
        return len(self.steps)

    def to_csv(self, path) -> Path:
        """Long format: one row per (step, tensor)."""
        path = Path(path)
        qk = [f"update_q{int(round(q * 100)):02d}" for q in QUANTILES]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "tensor", "median_update_over_grad", "median_update_over_param", *qk])
            for i, s in enumerate(self.steps):
                for j, n in enumerate(self.names):
                    w.writerow([int(s), n, self.grad_ratio[i, j], self.param_ratio[i, j],
                                *self.quantiles[i, j]])
        return path


def _median_ratio(num: Tensor, den: Tensor) -> float:
    keep = den != 0
    if not bool(keep.any()):
        return float("nan")
    return float((num[keep] / den[keep]).median())


class StepRecorder:
    """Context manager that logs per-tensor step statistics of ``optimizer`` (see module doc).

    ``names``: one name per parameter (in param-group order) or ``None``: taken from ``model``'s
    ``named_parameters``, else from the optimizer's ``spec.names`` (``LearnedOptimizer``), else
    ``group{i}.{j}``. ``every``: record every k-th step (1 = all). ``bin_edges``: log10 |update|
    histogram edges.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: Optional[Sequence[str]] = None,
                 model: Optional[torch.nn.Module] = None, every: int = 1,
                 bin_edges: Union[Sequence[float], np.ndarray, None] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if int(every) < 1:
            raise ValueError(f"Invalid every: {every} (need >= 1)")
        self.optimizer = optimizer
        self.every = int(every)
        self.bin_edges = np.asarray(DEFAULT_BIN_EDGES if bin_edges is None else bin_edges, dtype=float)
        if self.bin_edges.ndim != 1 or len(self.bin_edges) < 2 or np.any(np.diff(self.bin_edges) <= 0):
            raise ValueError("bin_edges: need >= 2 increasing values (log10 |update|)")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.names = self._names(names, model)
        self._edges_t = torch.as_tensor(self.bin_edges, dtype=torch.float64)
        self._handles = []
        self._before: Optional[List[Tensor]] = None
        self._count = 0
        self._rows: List[Dict[str, np.ndarray]] = []

    def _names(self, names, model) -> List[str]:
        n = len(self.params)
        if names is not None:
            names = [str(x) for x in names]
            if len(names) != n:
                raise ValueError(f"names: got {len(names)} names for {n} parameters")
            return names
        if model is not None:
            by_id = {id(p): k for k, p in model.named_parameters()}
            if all(id(p) in by_id for p in self.params):
                return [by_id[id(p)] for p in self.params]
        spec = getattr(self.optimizer, "spec", None)
        spec_names = list(getattr(spec, "names", []) or [])
        if len(spec_names) == n:
            return spec_names
        return [f"group{i}.{j}" for i, g in enumerate(self.optimizer.param_groups)
                for j in range(len(g["params"]))]

    # -- hooks -----------------------------------------------------------------------------------
    def _pre(self, optimizer, args, kwargs):
        self._count += 1
        if (self._count - 1) % self.every == 0:
            self._before = [p.detach().clone() for p in self.params]
        else:
            self._before = None

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs):
        if self._before is None:
            return
        L, Q, B = len(self.params), len(QUANTILES), len(self.bin_edges) - 1
        gr, pr = np.full(L, np.nan), np.full(L, np.nan)
        qs, hist = np.full((L, Q), np.nan), np.zeros((L, B))
        qt = torch.tensor(QUANTILES, dtype=torch.float64)
        for j, (p, p0) in enumerate(zip(self.params, self._before)):
            u = (p.detach() - p0).abs().double().reshape(-1)
            p0 = p0.abs().double().reshape(-1)
            if p.grad is not None:
                gr[j] = _median_ratio(u, p.grad.detach().abs().double().reshape(-1))
            pr[j] = _median_ratio(u, p0)
            if u.numel():
                qs[j] = torch.quantile(u, qt).numpy() if u.numel() < 2 ** 24 else np.nan
                lu = torch.log10(u.clamp_min(1e-300)).clamp(self.bin_edges[0], self.bin_edges[-1])
                idx = (torch.bucketize(lu, self._edges_t, right=True) - 1).clamp(0, B - 1)
                hist[j] = (torch.bincount(idx, minlength=B).double() / u.numel()).numpy()
        self._rows.append(dict(step=self._count, gr=gr, pr=pr, q=qs, h=hist))
        self._before = None

    def __enter__(self) -> "StepRecorder":
        if self._handles:
            raise RuntimeError("StepRecorder is already recording")
        self._handles = [self.optimizer.register_step_pre_hook(self._pre),
                         self.optimizer.register_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._before = None

    # -- results -----------------------------------------------------------------------------------
    def log(self) -> StepLog:
        """Everything recorded so far (recording may continue)."""
        L, Q, B = len(self.params), len(QUANTILES), len(self.bin_edges) - 1
        r = self._rows
        return StepLog(
            names=list(self.names),
            steps=np.array([x["step"] for x in r], dtype=int),
            grad_ratio=np.stack([x["gr"] for x in r]) if r else np.zeros((0, L)),
            param_ratio=np.stack([x["pr"] for x in r]) if r else np.zeros((0, L)),
            quantiles=np.stack([x["q"] for x in r]) if r else np.zeros((0, L, Q)),
            hist=np.stack([x["h"] for x in r]) if r else np.zeros((0, L, B)),
            bin_edges=self.bin_edges.copy())
