"""Small conv nets on image tensors ``[N, C, H, W]`` (bundled: 8x8 digits).

``conv3x3 -> act`` layers (the first keeps the resolution, later ones halve it with stride 2),
then a linear head on the flattened feature map. Same conventions as :mod:`metaopt.tasks.mlp`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from metaopt.tasks.base import ArrayDataset
from metaopt.tasks.data import jsonable
from metaopt.tasks.mlp import (ACTIVATIONS, DigitsFamilyBase, SupervisedModule, SupervisedTask,
                               check_activation,
                               data_dtype, infer_loss_and_outputs)


def _out_size(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1  # kernel 3, padding 1


class ConvModule(SupervisedModule):
    """A small conv net classifier: ``conv3x3 -> act`` layers (later ones stride 2), then a
    linear head; returns the supervised loss."""
    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], out_dim: int,
                 activation: str = "relu", loss: str = "ce", l2: float = 0.0):
        super().__init__(loss, l2)
        self.activation = check_activation(activation)
        c, h, w = (int(s) for s in in_shape)
        convs = []
        for i, ch in enumerate(channels):
            stride = 1 if i == 0 else 2
            convs.append(nn.Conv2d(c, int(ch), 3, stride=stride, padding=1))
            c, h, w = int(ch), _out_size(h, stride), _out_size(w, stride)
        self.convs = nn.ModuleList(convs)
        self.head = nn.Linear(c * h * w, int(out_dim))

    def outputs(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        h = x
        for conv in self.convs:
            h = act(conv(h))
        return self.head(h.flatten(1))


class ConvTask(SupervisedTask):
    """A conv net on any :class:`ArrayDataset` of images ``[N, C, H, W]`` (your own tensors)."""

    def __init__(self, data: ArrayDataset, channels: Sequence[int] = (8, 16),
                 activation: str = "relu", batch_size: int = 64, init_scale: float = 1.0,
                 loss: Optional[str] = None, num_outputs: Optional[int] = None, l2: float = 0.0,
                 name: str = "conv", dtype=None):
        x = data.x["train"]
        if x.dim() != 4:
            raise ValueError(f"ConvTask needs images [N, C, H, W]; got shape {tuple(x.shape)}")
        if int(batch_size) < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"Invalid channels: {channels}")
        in_shape = tuple(x.shape[1:])
        loss, out_dim = infer_loss_and_outputs(data, loss, num_outputs)
        module = ConvModule(in_shape, channels, out_dim, activation, loss, l2)
        module = module.to(data_dtype(data, dtype))
        structure = ("conv", in_shape, channels, out_dim, activation, loss, float(l2),
                     int(batch_size))
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=structure)


class DigitsConvFamily(DigitsFamilyBase):
    """Conv nets on 8x8 digits. Each task draws a channel count, a depth (number of conv
    layers, all with that many channels), an activation and a batch size from the lists, and
    an init scale log-uniformly from ``init_scale``; as in :class:`DigitsMLPFamily`, only the
    init scale stays out of the signature."""

    name = "digits_conv"

    def __init__(self, channels=(8, 12, 16), depths=(1, 2), activations=("relu", "tanh", "gelu"),
                 init_scale=(0.5, 2.0), batch_sizes=(32, 64, 128), split_seed: int = 0,
                 dtype=torch.float32):
        self.channels = self._parse_common(channels, "channels", depths, 1, activations,
                                           init_scale, batch_sizes, split_seed, dtype)

    def sample(self, generator: torch.Generator) -> ConvTask:
        ch, depth, activation, batch_size, init_scale = self._draw(generator, self.channels)
        return ConvTask(self.data, channels=(ch,) * depth, activation=activation,
                        batch_size=batch_size, init_scale=init_scale, loss="ce", num_outputs=10,
                        name=self.name, dtype=self.dtype)

    def config(self) -> Dict[str, Any]:
        return {k: jsonable(getattr(self, k)) for k in
                ("channels", "depths", "activations", "init_scale", "batch_sizes", "split_seed",
                 "dtype")}
