"""The scheme interface: how the coupled inner (w) and outer (theta) flows are discretized.

A scheme turns the current theta and the K persistent slots into one meta-gradient estimate and
the slots' advanced inner state. The trainer (metaopt.meta.trainer) owns everything else --
task sampling and resets, the outer optimizer, NaN handling, logging, checkpoints -- so a new
discretization is one new file implementing :class:`Scheme`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Type

from torch import Tensor

from metaopt.meta.slots import Slot
from metaopt.types import Params, State

SCHEMES: Dict[str, Type["Scheme"]] = {}


def register_scheme(cls):
    SCHEMES[cls.name] = cls
    return cls


def make_scheme(name: str, **kwargs) -> "Scheme":
    if name not in SCHEMES:
        raise ValueError(f"Unknown scheme name: {name!r} (known: {', '.join(sorted(SCHEMES))})")
    return SCHEMES[name](**kwargs)


@dataclass
class SchemeOutput:
    grads: Dict[str, Tensor]          # d meta_loss / d theta (mean over slots)
    meta_losses: List[float]          # per slot
    train_losses: List[float]         # per slot, mean inner training loss over the window
    params: List[Params]              # per slot, advanced and detached
    states: List[State]
    extras: List[Dict[str, Tensor]]   # per slot, scheme-carried tensors
    inner_steps: int                  # inner steps consumed per slot


class Scheme:
    name = "scheme"
    #: inner steps each slot advances per outer step
    window: int = 1

    def meta_gradient(self, rule, theta: Params, slots: List[Slot], meta_loss: str) -> SchemeOutput:
        raise NotImplementedError

    def config(self) -> dict:
        return {}
