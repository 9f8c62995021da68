"""How a rule's flat state (and a spec-dependent theta) maps onto the parameter tensors.

A rule declares, per key, one of three kinds (``Rule.state_layout``, ``Rule.theta_layout``):

* ``"coord"``  -- per coordinate: the last dim runs over the N coordinates of the flat view
  (``m`` [N] of Adam, ``m`` [K, N] of the mlp rule);
* ``"tensor"`` -- per tensor: the last dim runs over the T parameter tensors (``rms0`` [T]);
* ``"global"`` -- shared by all tensors (the ``step`` counter, loss statistics, scalars).

A declaration may name keys that some options leave out (Adam moments of a rule whose direction
is ``"sgd"``); every key a state holds must be declared. :class:`Layout` does the bookkeeping
that :class:`metaopt.optim.LearnedOptimizer` needs to present that state per parameter the way
``torch.optim`` does: one tensor's share, the state restricted to a subset of tensors and written
back, the state extended by new tensors, the flat state rebuilt from per-tensor pieces.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from metaopt.types import FlatSpec

COORD, TENSOR, GLOBAL = "coord", "tensor", "global"
KINDS = (COORD, TENSOR, GLOBAL)

__all__ = ["COORD", "TENSOR", "GLOBAL", "KINDS", "Layout", "guess_kind", "check_layout"]


def guess_kind(value, spec: FlatSpec) -> str:
    """The kind of an undeclared entry, from its last dim (N: coord, T: tensor, else global).
    Only for rules that declare no layout."""
    if isinstance(value, Tensor) and value.dim() > 0:
        if value.shape[-1] == spec.numel:
            return COORD
        if value.shape[-1] == spec.num_tensors:
            return TENSOR
    return GLOBAL


def check_layout(declared: Mapping[str, str], values: Mapping[str, Tensor], spec: FlatSpec,
                 what: str = "state") -> None:
    """ValueError unless every entry of ``values`` is declared with a kind its shape fits."""
    for k, v in values.items():
        kind = declared.get(k)
        if kind not in KINDS:
            raise ValueError(f"{what} key {k!r} has no declared layout (declared: "
                             f"{sorted(declared)}; kinds: {', '.join(KINDS)})")
        size = {COORD: spec.numel, TENSOR: spec.num_tensors}.get(kind)
        if size is not None and (v.dim() == 0 or v.shape[-1] != size):
            raise ValueError(f"{what} key {k!r} is declared {kind!r}, so its last dim should be "
                             f"{size}; it has shape {list(v.shape)}")


class Layout:
    """The kinds of a flat state's entries over ``spec``, declared (or, for rules that declare
    nothing, guessed from the last dim)."""

    def __init__(self, declared: Optional[Mapping[str, str]], values: Mapping[str, Tensor],
                 spec: FlatSpec, what: str = "state"):
        if declared is None:
            self.kinds: Dict[str, str] = {k: guess_kind(v, spec) for k, v in values.items()}
        else:
            check_layout(declared, values, spec, what)
            self.kinds = {k: declared[k] for k in values}
        self.spec = spec

    def _pieces(self, v: Tensor) -> List[Tensor]:
        return list(torch.split(v, list(self.spec.numels), dim=-1))

    def part(self, key: str, value: Tensor, i: int):
        """Tensor ``i``'s share of an entry (a view; per-coordinate entries shaped like it)."""
        kind = self.kinds[key]
        if kind == COORD:
            piece = self._pieces(value)[i]
            return piece.reshape(tuple(value.shape[:-1]) + tuple(self.spec.shapes[i]))
        return value.select(-1, i) if kind == TENSOR else value

    def select(self, state: Mapping[str, Tensor], idx: Sequence[int]) -> Dict[str, Tensor]:
        """The state restricted to the tensors ``idx`` (copies of the per-tensor entries)."""
        out = {}
        for k, v in state.items():
            if self.kinds[k] == COORD:
                pieces = self._pieces(v)
                out[k] = torch.cat([pieces[i] for i in idx], dim=-1)
            elif self.kinds[k] == TENSOR:
                out[k] = v[..., list(idx)]
            else:
                out[k] = v
        return out

    def write_(self, state: Dict[str, Tensor], sub: Mapping[str, Tensor],
               idx: Sequence[int]) -> Dict[str, Tensor]:
        """``state`` with the subset state ``sub`` (over tensors ``idx``) written back: per-tensor
        entries in place, shared ones replaced."""
        out = dict(state)
        for k, v in sub.items():
            if self.kinds[k] == COORD:
                pieces = self._pieces(state[k])
                sizes = [self.spec.numels[i] for i in idx]
                for i, piece in zip(idx, torch.split(v, sizes, dim=-1)):
                    pieces[i].copy_(piece)
            elif self.kinds[k] == TENSOR:
                state[k][..., list(idx)] = v.to(state[k].dtype)
            else:
                out[k] = v
        return out

    def extend(self, state: Mapping[str, Tensor], fresh: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The state over ``spec`` followed by new tensors whose fresh state is ``fresh``."""
        return {k: torch.cat([v, fresh[k].to(v)], dim=-1) if self.kinds[k] != GLOBAL else v
                for k, v in state.items()}

    def assemble(self, key: str, ref: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """An entry rebuilt from per-tensor parts shaped like :meth:`part`'s (cast to ``ref``);
        a shared entry from the first part."""
        kind = self.kinds[key]
        parts = [q.to(device=ref.device, dtype=ref.dtype) for q in parts]
        if kind == GLOBAL:
            return parts[0].clone()
        if kind == TENSOR:
            return torch.stack(parts, dim=-1)
        lead = tuple(ref.shape[:-1])
        return torch.cat([q.reshape(lead + (n,)) for q, n in zip(parts, self.spec.numels)], dim=-1)
