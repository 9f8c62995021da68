"""MLP autoencoders: reconstruct the input through a bottleneck (an unsupervised loss).

``AutoencoderTask(x, hidden=(64, 8, 64))`` works on any array of inputs; the targets are the
inputs themselves (flattened). ``loss="mse"`` (half mean squared error on the raw outputs) or
``"bce"`` (per-pixel binary cross entropy on logits, for inputs in [0, 1]).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor

from metaopt.tasks.base import ArrayDataset, TaskFamily, choice, log_uniform
from metaopt.tasks.data import resolve_dtype, as_choices, as_range, jsonable, load_sklearn
from metaopt.tasks.mlp import MLPTask, check_activation

AE_LOSSES = ("mse", "bce")


def reconstruction_dataset(x: Tensor, seed: int = 0, name: str = "data") -> ArrayDataset:
    x = x.flatten(1)
    return ArrayDataset(x, x.clone(), seed=seed, name=name)


class AutoencoderTask(MLPTask):
    """An MLP autoencoder on any :class:`ArrayDataset` of inputs (targets = inputs);
    ``loss``: ``mse`` or ``bce``."""
    def __init__(self, data: ArrayDataset, hidden: Sequence[int] = (32, 8, 32),
                 activation: str = "relu", batch_size: int = 64, init_scale: float = 1.0,
                 loss: str = "mse", name: str = "autoencoder", dtype=None):
        if loss not in AE_LOSSES:
            raise ValueError(f"Invalid loss: {loss!r} (use one of {', '.join(AE_LOSSES)})")
        out = int(data.y["train"][0].numel())
        super().__init__(data, hidden=hidden, activation=activation, batch_size=batch_size,
                         init_scale=init_scale, loss=loss, num_outputs=out, name=name,
                         dtype=dtype)


class DigitsAEFamily(TaskFamily):
    """Autoencoders on the 8x8 digits (64 pixels in [0, 1]): encoder widths ``widths``,
    bottleneck ``bottlenecks``, mirrored decoder; activation, loss and batch size sampled."""

    name = "digits_ae"

    def __init__(self, widths=(32, 64), bottlenecks=(4, 8, 16), activations=("relu", "tanh"),
                 losses=("mse",), init_scale=(0.5, 2.0), batch_sizes=(64,), split_seed: int = 0,
                 dtype=torch.float32):
        self.widths = as_choices(widths, "widths")
        self.bottlenecks = as_choices(bottlenecks, "bottlenecks")
        self.activations = tuple(check_activation(a) for a in as_choices(activations, "activations", str))
        self.losses = as_choices(losses, "losses", str)
        if any(l not in AE_LOSSES for l in self.losses):
            raise ValueError(f"Invalid losses: {list(losses)!r} (use values from {', '.join(AE_LOSSES)})")
        if min(self.widths) < 1 or min(self.bottlenecks) < 1:
            raise ValueError(f"Invalid widths/bottlenecks: {widths!r}, {bottlenecks!r}")
        self.init_scale = as_range(init_scale, "init_scale")
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        self.split_seed = int(split_seed)
        self.dtype = resolve_dtype(dtype)
        x, _ = load_sklearn("digits", dtype=self.dtype, flat=True)
        self.data = reconstruction_dataset(x, self.split_seed, name="digits")

    def sample(self, generator: torch.Generator) -> AutoencoderTask:
        w = choice(generator, self.widths)
        b = choice(generator, self.bottlenecks)
        act = choice(generator, self.activations)
        loss = choice(generator, self.losses)
        bs = choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        return AutoencoderTask(self.data, hidden=(w, b, w), activation=act, batch_size=bs,
                               init_scale=init_scale, loss=loss, name=self.name, dtype=self.dtype)

    def config(self) -> Dict[str, Any]:
        return {k: jsonable(getattr(self, k)) for k in
                ("widths", "bottlenecks", "activations", "losses", "init_scale", "batch_sizes",
                 "split_seed", "dtype")}
