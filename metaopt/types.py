"""Shared types and the flat view of a parameter dict.

Parameters everywhere are ``dict[str, Tensor]`` keyed by ``named_parameters`` names.
Rules that act per coordinate work on one flat vector (``FlatSpec.flatten``) so that one
rule call is a few large tensor ops instead of a Python loop over tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import Tensor

Params = Dict[str, Tensor]
State = Dict[str, Tensor]
Batch = Tuple[Tensor, ...]
# ctx keys: "loss" (scalar Tensor, the current batch loss), "act" (dict name -> Tensor[F], per-tensor
# activation statistics of the layer owning that parameter), "step" is carried in rule state.
Context = Dict[str, Any]


@dataclass(frozen=True)
class FlatSpec:
    """Names, shapes and segment ids of a parameter dict laid out as one flat vector."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> "FlatSpec":
        # Shapes are read from the last dims so a vmapped/batched dict gives the per-task spec.
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Tuple[int, ...]]) -> "FlatSpec":
        return cls(tuple(shapes), tuple(tuple(s) for s in shapes.values()))

    @property
    def numels(self) -> Tuple[int, ...]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return tuple(out)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    def segment_ids(self, device=None) -> Tensor:
        """Long tensor [N]: which tensor each flat coordinate belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.num_tensors, device=device),
            torch.tensor(self.numels, device=device),
        )

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> Params:
        parts = torch.split(vec, self.numels)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def to_json(self) -> list:
        """Ordered [[name, shape], ...] (order matters: it fixes the flat layout)."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]

    @classmethod
    def from_json(cls, pairs) -> "FlatSpec":
        return cls(tuple(n for n, _ in pairs), tuple(tuple(s) for _, s in pairs))


def segment_sum(x: Tensor, seg: Tensor, num_segments: int) -> Tensor:
    """Sum of ``x`` (last dim = flat coordinates) within each segment -> [..., num_segments]
    (differentiable and vmappable)."""
    sums = torch.zeros(x.shape[:-1] + (num_segments,), dtype=x.dtype, device=x.device)
    return sums.index_add(-1, seg, x)


def segment_mean(x: Tensor, seg: Tensor, num_segments: int) -> Tensor:
    """Mean of ``x`` (last dim = flat coordinates) within each segment -> [..., num_segments]."""
    counts = torch.bincount(seg, minlength=num_segments).to(x.dtype)
    return segment_sum(x, seg, num_segments) / counts


def safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at 0: dead units give g = v = 0 exactly, and a plain
    sqrt's infinite derivative times that zero would poison the meta-gradient."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))
