"""Meta-training distributions: a weighted mixture of task families, and Celo-style task
augmentation by a random per-tensor reparameterization of parameter scale.

Augmentation (Celo, Moudgil et al. 2025; also learned_optimization's ``ReparamWeights``): a task
with parameters ``w`` is replaced by the *same* loss over ``w' = w / s`` with one random scale
``s`` per tensor (log-uniform), i.e. ``L'(w') = L(s * w')`` and ``w'_0 = w_0 / s``. The function
being minimized and its minimizers are unchanged; only the coordinates the optimizer sees are
rescaled (gradients by ``s``, weights by ``1/s``). A rule trained on such tasks cannot rely on
the absolute scale of weights or gradients, which is what it meets on a new model.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch

from metaopt.tasks.base import Task, TaskFamily, log_uniform
from metaopt.tasks.data import as_range, jsonable
from metaopt.types import Batch, Params

PREFIX = "reparam::"


class ReparamTask(Task):
    """``base``'s loss over reparameterized weights ``w' = w / scales`` (see module docstring).
    The scales are buffers, so reparameterized tasks of one architecture still vmap together."""

    def __init__(self, base: Task, scales: Mapping[str, float]):
        shapes = base.param_shapes()
        missing = [k for k in shapes if k not in scales]
        if missing:
            raise ValueError(f"ReparamTask: no scale for parameter {missing[0]!r}")
        dtype = next(iter(base.module.parameters())).dtype
        buffers = {**base.buffers,
                   **{PREFIX + k: torch.tensor(float(scales[k]), dtype=dtype) for k in shapes}}
        super().__init__(base.name, base.module, data=base.data, batch_size=base.batch_size,
                         buffers=buffers, init_scale=base.init_scale,
                         structure=("reparam", base.structure))
        self.base = base

    def apply(self, params: Params, buffers: Params, batch: Batch, stats: bool = False):
        base_buffers = {k: v for k, v in buffers.items() if not k.startswith(PREFIX)}
        w = {k: p * buffers[PREFIX + k].to(p.dtype) for k, p in params.items()}
        return self.base.apply(w, base_buffers, batch, stats=stats)

    def init_params(self, generator: torch.Generator) -> Params:
        return {k: v / self.buffers[PREFIX + k].to(v.dtype)
                for k, v in self.base.init_params(generator).items()}

    def to_base(self, params: Params) -> Params:
        """The base task's weights ``w = s * w'``."""
        return {k: p * self.buffers[PREFIX + k].to(p.dtype) for k, p in params.items()}

    # data come from the base task (some tasks override sampling)
    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        return self.base.sample_batch(split, generator)

    def full_batch(self, split: str) -> Batch:
        return self.base.full_batch(split)

    def __repr__(self) -> str:
        return f"Reparam({self.base!r})"


class MixtureFamily(TaskFamily):
    """Sample a member family (by weight), then a task from it; optionally reparameterize it.

    ``members``: ``{family_name: {option: value, ..., "weight": w}}`` -- each member is built
    with ``make_family(family_name, **options)``. ``reparam_prob``: probability that a sampled
    task is augmented; ``reparam_range``: the log-uniform range of the per-tensor scales.
    """

    name = "mixture"

    def __init__(self, members: Mapping[str, Mapping[str, Any]], reparam_prob: float = 0.0,
                 reparam_range: Sequence[float] = (0.1, 10.0), dtype=torch.float32):
        from metaopt.tasks import make_family  # the registry imports this module

        if not members:
            raise ValueError("Invalid members: need at least one task family")
        if not 0.0 <= float(reparam_prob) <= 1.0:
            raise ValueError(f"Invalid reparam_prob: {reparam_prob} (must be in [0, 1])")
        self.reparam_prob = float(reparam_prob)
        self.reparam_range = as_range(reparam_range, "reparam_range")
        self.members: Dict[str, TaskFamily] = {}
        weights = []
        self._options = {}
        for fam_name, opts in members.items():
            opts = dict(opts or {})
            w = float(opts.pop("weight", 1.0))
            if not w > 0:
                raise ValueError(f"Invalid members.{fam_name}.weight: {w} (must be > 0)")
            try:
                self.members[fam_name] = make_family(fam_name, dtype=dtype, **opts)
            except ValueError as e:
                raise ValueError(f"members.{fam_name}: {e}") from None
            weights.append(w)
            self._options[fam_name] = {**opts, "weight": w}
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def sample(self, generator: torch.Generator) -> Task:
        i = int(torch.multinomial(self.weights, 1, generator=generator))
        task = list(self.members.values())[i].sample(generator)
        if self.reparam_prob > 0 and float(torch.rand((), generator=generator)) < self.reparam_prob:
            scales = {k: log_uniform(generator, *self.reparam_range) for k in task.param_shapes()}
            task = ReparamTask(task, scales)
        return task

    def config(self) -> Dict[str, Any]:
        return {"members": jsonable(self._options), "reparam_prob": self.reparam_prob,
                "reparam_range": list(self.reparam_range)}
