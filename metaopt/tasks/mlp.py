"""Multi-layer perceptrons on array data, and the supervised-task base shared with the
logistic-regression and conv tasks.

A supervised module's ``forward(x, y)`` returns the scalar loss (the Task contract);
``forward(x)`` without targets returns the outputs (logits), which :meth:`SupervisedTask.accuracy`
uses. Both go through ``functional_call`` on a params dict, so both vmap.

``MLPTask(data, hidden=(64,), activation="relu")`` works on any :class:`ArrayDataset`, e.g.
``ArrayDataset(my_x, my_y)``; :class:`DigitsMLPFamily` samples architectures on bundled digits.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metaopt.tasks.base import ArrayDataset, Task, TaskFamily, choice, log_uniform
from metaopt.tasks.data import (resolve_dtype, as_choices, as_range, jsonable, make_dataset)
from metaopt.types import Batch, Params

ACTIVATIONS = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
}
LOSSES = ("ce", "bce", "mse")


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"Invalid activation: {name!r} (use one of {', '.join(ACTIVATIONS)})")
    return name


def supervised_loss(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """``ce``: softmax cross entropy on class ids; ``bce``: one logit per example, 0/1 targets;
    ``mse``: half mean squared error (a ``[B, 1]`` output matches ``[B]`` targets)."""
    if kind == "ce":
        if out.dim() == 2 and y.dim() == 1:
            # F.cross_entropy's own composition (nll of log_softmax), written out: the same value
            # eager, under vmap (where cross_entropy's batching rule decomposes slowly) and
            # under torch.compile, with no need to ask whether the tensor is batched
            return -F.log_softmax(out, -1).gather(-1, y.long()[:, None]).mean()
        return F.cross_entropy(out, y)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.to(out.dtype))
    if kind == "mse":
        if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
            out = out.squeeze(-1)
        return 0.5 * (out - y).pow(2).mean()
    raise ValueError(f"Invalid loss: {kind!r} (use one of {LOSSES})")


def l2_penalty(tensors, l2: float) -> Tensor:
    """``0.5 * l2 * sum ||W||^2`` over weight matrices/kernels only (dim >= 2; not biases)."""
    return 0.5 * l2 * sum(t.pow(2).sum() for t in tensors if t.dim() >= 2)


class SupervisedModule(nn.Module):
    """Model + criterion. Subclasses implement ``outputs(x)``."""

    def __init__(self, loss: str, l2: float = 0.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r} (use one of {LOSSES})")
        if l2 < 0:
            raise ValueError(f"Invalid l2: {l2}")
        self.loss_kind = loss
        self.l2 = float(l2)

    def outputs(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.outputs(x)
        if y is None:
            return out
        loss = supervised_loss(self.loss_kind, out, y)
        if self.l2:
            loss = loss + l2_penalty(self.parameters(), self.l2)
        return loss


class SupervisedTask(Task):
    """A task on an :class:`ArrayDataset` whose module is a :class:`SupervisedModule`."""

    @property
    def is_classifier(self) -> bool:
        return self.module.loss_kind in ("ce", "bce")

    def outputs(self, params: Params, x: Tensor, buffers: Optional[Params] = None) -> Tensor:
        tensors = {**params, **(self.buffers if buffers is None else buffers)}
        return functional_call(self.module, tensors, (x,))

    def accuracy(self, params: Params, batch: Batch, buffers: Optional[Params] = None) -> Tensor:
        """Fraction of correct predictions on ``batch = (x, y)`` (a 0-dim tensor; vmappable)."""
        if not self.is_classifier:
            raise ValueError(f"accuracy needs a classification task; {self.name!r} uses "
                             f"loss={self.module.loss_kind!r}")
        x, y = batch[0], batch[1]
        out = self.outputs(params, x, buffers)
        if self.module.loss_kind == "bce":
            pred = (out.squeeze(-1) > 0).to(y.dtype)
        else:
            pred = out.argmax(-1)
        return (pred == y).to(out.dtype).mean()

    def evaluate_accuracy(self, params: Params, split: str = "valid") -> float:
        with torch.no_grad():
            return float(self.accuracy(params, self.full_batch(split)))


def infer_loss_and_outputs(data: ArrayDataset, loss: Optional[str],
                           num_outputs: Optional[int]) -> Tuple[str, int]:
    """Classification (integer targets) -> ``ce`` with one output per class (``bce`` -> 1);
    float targets -> ``mse`` with one output per target column."""
    y = data.y["train"]
    if loss is None:
        loss = "mse" if y.is_floating_point() else "ce"
    if num_outputs is None:
        if loss == "ce":
            num_outputs = int(max(int(data.y[s].max()) for s in ("train", "valid", "test"))) + 1
        elif loss == "bce":
            num_outputs = 1
        else:
            num_outputs = 1 if y.dim() == 1 else int(y[0].numel())
    return loss, int(num_outputs)


def data_dtype(data: ArrayDataset, dtype) -> torch.dtype:
    if dtype is not None:
        return resolve_dtype(dtype)
    x = data.x["train"]
    return x.dtype if x.is_floating_point() else torch.float32


NORMS = ("none", "layer", "batch")


class MLPModule(SupervisedModule):
    """``Linear -> [norm] -> act -> ... -> Linear``; inputs are flattened from dim 1 on.
    ``hidden=()`` is a linear model (logistic/softmax regression with ``ce``/``bce``).
    ``norm``: ``layer`` (LayerNorm, vmappable) or ``batch`` (BatchNorm1d, batch statistics in
    training mode; running statistics are buffers, so use it with plain autograd, not vmap)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "relu",
                 loss: str = "ce", l2: float = 0.0, norm: str = "none"):
        super().__init__(loss, l2)
        if norm not in NORMS:
            raise ValueError(f"Invalid norm: {norm!r} (use one of {', '.join(NORMS)})")
        self.activation = check_activation(activation)
        self.norm = norm
        dims = [int(in_dim), *(int(h) for h in hidden), int(out_dim)]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        norm_cls = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}.get(norm)
        self.norms = nn.ModuleList(norm_cls(int(h)) for h in hidden) if norm_cls else None

    def outputs(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        h = x.flatten(1) if x.dim() > 2 else x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                if self.norms is not None:
                    h = self.norms[i](h)
                h = act(h)
        return h


class MLPTask(SupervisedTask):
    """An MLP on any :class:`ArrayDataset` (your own tensors: ``ArrayDataset(x, y)``).

    ``loss`` defaults to cross entropy for integer targets and MSE for float targets; the
    number of outputs is inferred from the targets unless ``num_outputs`` is given. The dtype
    follows the data's features unless ``dtype`` is given (then pass data of that dtype).
    """

    def __init__(self, data: ArrayDataset, hidden: Sequence[int] = (64,), activation: str = "relu",
                 batch_size: int = 64, init_scale: float = 1.0, loss: Optional[str] = None,
                 num_outputs: Optional[int] = None, l2: float = 0.0, name: str = "mlp",
                 dtype=None, norm: str = "none"):
        if int(batch_size) < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"Invalid hidden widths: {hidden}")
        loss, out_dim = infer_loss_and_outputs(data, loss, num_outputs)
        in_dim = int(data.x["train"][0].numel())
        module = MLPModule(in_dim, hidden, out_dim, activation, loss, l2, norm).to(data_dtype(data, dtype))
        structure = ("mlp", in_dim, hidden, out_dim, activation, loss, float(l2), int(batch_size), norm)
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=structure)


class DigitsFamilyBase(TaskFamily):
    """Shared option parsing and sampling of the digits families (MLP widths / conv channels)."""

    def _parse_common(self, sizes, size_name, depths, min_depth, activations, init_scale,
                      batch_sizes, split_seed, dtype):
        sizes_t = as_choices(sizes, size_name)
        self.depths = as_choices(depths, "depths")
        self.activations = tuple(check_activation(a) for a in as_choices(activations, "activations", str))
        self.init_scale = as_range(init_scale, "init_scale")
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        for name, vals, lo, raw in ((size_name, sizes_t, 1, sizes), ("depths", self.depths, min_depth, depths),
                                    ("batch_sizes", self.batch_sizes, 1, batch_sizes)):
            if min(vals) < lo:
                raise ValueError(f"Invalid {name}: {raw!r}")
        self.split_seed = int(split_seed)
        self.dtype = resolve_dtype(dtype)
        return sizes_t

    @property
    def data(self) -> ArrayDataset:
        return make_dataset("digits", self.split_seed, dtype=self.dtype)

    def _draw(self, generator: torch.Generator, sizes):
        """(size, depth, activation, batch size, init scale), in this order from ``generator``."""
        return (choice(generator, sizes), choice(generator, self.depths),
                choice(generator, self.activations), choice(generator, self.batch_sizes),
                log_uniform(generator, *self.init_scale))


class DigitsMLPFamily(DigitsFamilyBase):
    """MLPs on scikit-learn's 8x8 digits (10 classes, cross entropy).

    Each task draws a width, a depth (number of hidden layers, all of that width), an
    activation and a batch size from the given lists (a single value fixes it), and an init
    scale log-uniformly from ``init_scale`` (a number fixes it). Width/depth/activation/batch
    size are part of the task's ``signature``; the init scale only changes ``init_params``, so
    tasks of one architecture vmap together. Data split (60/20/20) is fixed by ``split_seed``.
    """

    name = "digits_mlp"

    def __init__(self, widths=(16, 32, 64, 128), depths=(1, 2, 3),
                 activations=("relu", "tanh", "gelu"), init_scale=(0.5, 2.0),
                 batch_sizes=(32, 64, 128), split_seed: int = 0, dtype=torch.float32,
                 norms=("none",)):
        self.norms = tuple(as_choices(norms, "norms", str))
        if any(n not in NORMS for n in self.norms):
            raise ValueError(f"Invalid norms: {list(norms)!r} (use values from {', '.join(NORMS)})")
        self.widths = self._parse_common(widths, "widths", depths, 0, activations, init_scale,
                                         batch_sizes, split_seed, dtype)

    def sample(self, generator: torch.Generator) -> MLPTask:
        width, depth, activation, batch_size, init_scale = self._draw(generator, self.widths)
        # drawn last, so families without the option sample exactly what they sampled before
        norm = choice(generator, self.norms) if len(self.norms) > 1 else self.norms[0]
        return MLPTask(self.data, hidden=(width,) * depth, activation=activation,
                       batch_size=batch_size, init_scale=init_scale, loss="ce", num_outputs=10,
                       name=self.name, dtype=self.dtype, norm=norm)

    def config(self) -> Dict[str, Any]:
        return {k: jsonable(getattr(self, k)) for k in
                ("widths", "depths", "activations", "init_scale", "batch_sizes", "split_seed",
                 "dtype", "norms")}
