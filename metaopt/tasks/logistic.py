"""Logistic regression on a bundled tabular data set: a convex, well-understood task.

Binary problems (``breast_cancer``) use one logit and binary cross entropy; multi-class ones
(``wine``, ``digits``) use softmax regression. Features are standardized with train-split
statistics (see :mod:`metaopt.tasks.data`). An optional ``l2`` penalty ``0.5 * l2 * ||W||^2``
makes the problem strongly convex (breast_cancer is nearly separable, so without it the
weights keep growing slowly).
"""
from __future__ import annotations

from typing import Any, Dict

import torch

from metaopt.tasks.base import ArrayDataset, TaskFamily, choice, log_uniform
from metaopt.tasks.data import (check_dataset_name, resolve_dtype, as_choices, as_range,
                                is_classification, jsonable, make_dataset)
from metaopt.tasks.mlp import MLPTask


class LogisticTask(MLPTask):
    """Logistic (or softmax) regression on any :class:`ArrayDataset` with integer labels."""

    def __init__(self, data: ArrayDataset, batch_size: int = 32, init_scale: float = 1.0,
                 l2: float = 0.0, name: str = "logreg", dtype=None):
        y = data.y["train"]
        if y.is_floating_point():
            raise ValueError("LogisticTask needs integer class labels (got float targets)")
        n_classes = max(int(data.y[s].max()) for s in ("train", "valid", "test")) + 1
        loss = "bce" if n_classes <= 2 else "ce"
        super().__init__(data, hidden=(), activation="relu", batch_size=batch_size,
                         init_scale=init_scale, loss=loss,
                         num_outputs=1 if loss == "bce" else n_classes, l2=l2, name=name,
                         dtype=dtype)


class LogisticFamily(TaskFamily):
    """Logistic regression tasks on one data set that differ in init scale (log-uniform in
    ``init_scale``) and batch size (one value or a list to choose from). The train/valid/test
    split (60/20/20) is fixed by ``split_seed``."""

    name = "logreg_cancer"  # registry name (the dataset option can change the data)

    def __init__(self, dataset: str = "breast_cancer", batch_size=32, split_seed: int = 0,
                 init_scale=(0.5, 2.0), l2: float = 0.0, dtype=torch.float32):
        self.dataset = check_dataset_name(dataset)
        if not is_classification(dataset):
            raise ValueError(f"Invalid dataset: {dataset!r} (logistic regression needs labels)")
        self.batch_size = as_choices(batch_size, "batch_size")
        if min(self.batch_size) < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        self.split_seed = int(split_seed)
        self.init_scale = as_range(init_scale, "init_scale")
        if l2 < 0:
            raise ValueError(f"Invalid l2: {l2}")
        self.l2 = float(l2)
        self.dtype = resolve_dtype(dtype)
        self.task_name = f"logreg_{self.dataset}"

    @property
    def data(self) -> ArrayDataset:
        return make_dataset(self.dataset, self.split_seed, dtype=self.dtype, flat=True)

    def sample(self, generator: torch.Generator) -> LogisticTask:
        batch_size = choice(generator, self.batch_size)
        init_scale = log_uniform(generator, *self.init_scale)
        return LogisticTask(self.data, batch_size=batch_size, init_scale=init_scale, l2=self.l2,
                            name=self.task_name, dtype=self.dtype)

    def config(self) -> Dict[str, Any]:
        bs = self.batch_size[0] if len(self.batch_size) == 1 else list(self.batch_size)
        return {"dataset": self.dataset, "batch_size": bs, "split_seed": self.split_seed,
                "init_scale": jsonable(self.init_scale), "l2": self.l2,
                "dtype": jsonable(self.dtype)}
