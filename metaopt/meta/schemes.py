"""The scheme interface: how the coupled inner (w) and outer (theta) flows are discretized.

A scheme turns the current theta and the K persistent slots into one meta-gradient estimate and
the slots advanced by one window. The trainer (metaopt.meta.trainer) owns everything else --
task sampling and resets, the outer optimizer, NaN handling, logging, checkpoints -- so a new
discretization is one new file implementing :meth:`Scheme.estimate`, usually a ``group_fn`` for
the slot engine (metaopt.meta.engine). Schemes never import each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type, Union

from torch import Tensor

from metaopt.meta.slots import Slot
from metaopt.meta.unroll import MetaLoss, UnrollOut, get_meta_loss
from metaopt.types import Params

SCHEMES: Dict[str, Type["Scheme"]] = {}


def register_scheme(cls):
    """Class decorator: make a :class:`Scheme` subclass available as ``make_scheme(cls.name)``
    (and as ``scheme=<name>`` once it has a config node)."""
    SCHEMES[cls.name] = cls
    return cls


def make_scheme(name: str, **kwargs) -> "Scheme":
    """A registered scheme by name (``nested``, ``interleaved``, ``continuous``, ``es``, ``pes``),
    built with ``kwargs``, e.g. ``make_scheme("nested", truncation=25)``; an unknown name is a
    ValueError listing the known ones."""
    if name not in SCHEMES:
        raise ValueError(f"Unknown scheme name: {name!r} (known: {', '.join(sorted(SCHEMES))})")
    return SCHEMES[name](**kwargs)


@dataclass
class SchemeOutput:
    grads: Dict[str, Tensor]  # d meta_loss / d theta (mean over slots), detached
    outs: List[UnrollOut]     # per slot, detached: meta-loss, train loss, advanced params/state/extra
    slots: List[Slot]         # the slots advanced by ``inner_steps`` (new objects; inputs untouched)
    inner_steps: int          # inner steps consumed per slot

    # read-only per-slot views, for logging and tests
    @property
    def meta_losses(self) -> List[float]:
        return [float(o.meta_loss) for o in self.outs]

    @property
    def train_losses(self) -> List[float]:
        return [float(o.train_loss) for o in self.outs]

    @property
    def params(self) -> List[Params]:
        return [o.params for o in self.outs]

    @property
    def states(self) -> List[Params]:
        return [o.state for o in self.outs]

    @property
    def extras(self) -> List[Dict[str, Tensor]]:
        return [o.extra for o in self.outs]


def _detached(o: UnrollOut) -> UnrollOut:
    # clone: results of a vmapped group are views into one stacked tensor
    d = lambda tree: {k: v.detach().clone() for k, v in tree.items()}
    return UnrollOut(o.meta_loss.detach(), o.train_loss.detach(), d(o.params), d(o.state),
                     d(o.extra))


class Scheme:
    """Base class of the discretizations: :meth:`estimate` turns theta and the slots into a
    meta-gradient and the slots advanced by one window."""
    name = "scheme"
    #: inner steps each slot advances per outer step
    window: int = 1
    #: whether same-signature slots run as one vmapped call (schemes that offer the choice)
    use_vmap: bool = True

    def backprop_truncation(self, theta: Optional[Params] = None) -> int:
        """The inner steps over which this scheme backpropagates its meta-loss through the
        unroll (its truncation): what a wrapper that swaps in another reverse-mode estimator
        over the same window (local meta-gradients, :mod:`metaopt.meta.local`) needs. ``theta``
        None: as far as known before training. A scheme that estimates otherwise (perturbations,
        an ODE, forward mode) raises ValueError saying so (``"scheme=... (use ...)"``)."""
        raise ValueError(f"scheme={self.name!r} (use scheme=nested or scheme=interleaved, or "
                         f"local.meta=global)")

    def estimate(self, rule, theta: Params, slots: List[Slot],
                 meta_loss: MetaLoss) -> Tuple[Dict[str, Tensor], List[UnrollOut]]:
        """(meta-gradient, per-slot UnrollOut of the window). The one method a scheme implements."""
        raise NotImplementedError

    def meta_gradient(self, rule, theta: Params, slots: List[Slot],
                      meta_loss: Union[str, MetaLoss]) -> SchemeOutput:
        grads, outs = self.estimate(rule, theta, slots, get_meta_loss(meta_loss))
        outs = [_detached(o) for o in outs]
        return SchemeOutput(grads={k: g.detach() for k, g in grads.items()}, outs=outs,
                            slots=[s.advanced(o, self.window) for s, o in zip(slots, outs)],
                            inner_steps=self.window)

    def config(self) -> dict:
        return {}
