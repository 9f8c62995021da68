"""The optimizers a user would pick instead of a learned one, each at its documented defaults.

Nothing here is tuned, per problem or at all: a learned optimizer's pitch is that it needs no
learning-rate search, so its peers are what a user gets by typing the constructor with the
values its documentation gives. Each peer is a factory ``named_params -> optimizer`` (the
``(name, tensor)`` list of :func:`metaopt.meta.speedup.train_curve`); the result has
``step(closure)`` and ``zero_grad()`` like any ``torch.optim.Optimizer``.

* ``adam``: ``torch.optim.Adam(lr=3e-3)`` (the usual "Adam with a reasonable lr"; the speedup
  metric's reference is Adam with the lr tuned in hindsight, this is the untuned one).
* ``adamw``: ``torch.optim.AdamW`` at its defaults (lr 1e-3, weight decay 1e-2).
* ``muon``: ``torch.optim.Muon`` at its defaults (lr 1e-3, weight decay 0.1, momentum 0.95,
  Nesterov) on the hidden 2-D weight matrices, ``AdamW(lr=3e-3, weight_decay=0)`` on
  everything else: the input layer and embeddings, the output layer, biases, norm gains, and
  conv kernels (torch's Muon accepts only 2-D parameters). This follows Muon's guidance (Keller
  Jordan's post; torch's docstring): "Muon is an optimizer for 2D parameters of neural network
  hidden layers". A model with no hidden matrix (a linear model, a conv net) gets AdamW alone.
* ``muon_kj``: the same with Muon at ``lr=0.02`` (Keller Jordan's value, also the one in
  torch's docstring example); not among the default peers.
* ``prodigy``: ``prodigyopt.Prodigy(lr=1.0)`` (its defaults; it estimates the step size).
* ``schedulefree``: ``schedulefree.AdamWScheduleFree`` at its defaults (lr 0.0025, no warm-up).
  Schedule-free trains at one point (y) and must be evaluated at another (x, the average):
  its documentation requires ``opt.train()`` before training steps and ``opt.eval()`` before
  evaluating. :class:`ScheduleFreeAtRest` does both around every step, so between steps (where
  the speedup evaluation reads the loss, and at the end of a run) the parameters are x.

``prodigyopt`` and ``schedulefree`` are optional dependencies: :func:`make_peers` skips a peer
whose package is missing with a one-line message.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Named = Sequence[Tuple[str, Tensor]]

#: the default peers of ``metaopt-eval --config-name=suite`` (speedup.peers)
DEFAULT_PEERS = ("adam", "adamw", "muon", "prodigy", "schedulefree")

# a 2-D parameter whose dotted name has one of these parts is an embedding table, not a
# hidden layer (token/position embeddings, nn.Embedding modules called *emb*)
_EMBEDDING = re.compile(r"(^|\.)(tok|pos|wte|wpe|users|items|[a-z_]*emb[a-z_]*)(\.|$)")


class MultiOptimizer:
    """Several optimizers over disjoint parameter sets, stepped as one: ``step(closure)``
    evaluates the closure once, then steps each; ``zero_grad`` zeroes all."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("Invalid optimizers: empty")
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> List[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return f"MultiOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


class ScheduleFreeAtRest:
    """A schedule-free optimizer (``.train()``/``.eval()`` API) left in eval mode between steps:
    ``step`` switches to train mode (parameters = y, where gradients are taken), steps, and
    switches back to eval mode (parameters = x, the point to evaluate). Loss evaluations
    between steps and the final parameters therefore see x, as the schedulefree documentation
    prescribes. (Each switch is a ``lerp`` over the parameters; the y -> x -> y round trip is
    exact up to rounding.)"""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.optimizer.eval()

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable] = None):
        self.optimizer.train()
        try:
            return self.optimizer.step(closure)
        finally:
            self.optimizer.eval()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"ScheduleFreeAtRest({type(self.optimizer).__name__})"


def muon_split(named: Named) -> Tuple[List[Tuple[str, Tensor]], List[Tuple[str, Tensor]]]:
    """``(hidden, other)``: the hidden 2-D weight matrices (for Muon) and everything else.
    Hidden = 2-D, not an embedding table (see ``_EMBEDDING``), and neither the first nor the
    last parameter of dim >= 2 in ``named`` order (the input layer and the output head, in
    ``named_parameters`` order). Conv kernels (4-D) are never hidden: torch's Muon takes 2-D
    parameters only."""
    named = list(named)
    mats = [i for i, (_, p) in enumerate(named) if p.dim() >= 2]
    ends = {mats[0], mats[-1]} if mats else set()
    hidden, other = [], []
    for i, (n, p) in enumerate(named):
        is_hidden = p.dim() == 2 and i not in ends and not _EMBEDDING.search(n)
        (hidden if is_hidden else other).append((n, p))
    return hidden, other


def adam(named: Named) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for _, p in named], lr=3e-3)


def adamw(named: Named) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in named])


def _muon(named: Named, **muon_kw):
    hidden, other = muon_split(named)
    opts = []
    if hidden:
        opts.append(torch.optim.Muon([p for _, p in hidden], **muon_kw))
    if other:
        opts.append(torch.optim.AdamW([p for _, p in other], lr=3e-3, weight_decay=0.0))
    return MultiOptimizer(opts)


def muon(named: Named) -> MultiOptimizer:
    return _muon(named)


def muon_kj(named: Named) -> MultiOptimizer:
    return _muon(named, lr=0.02)


def prodigy(named: Named):
    from prodigyopt import Prodigy
    return Prodigy([p for _, p in named], lr=1.0)


def schedulefree(named: Named) -> ScheduleFreeAtRest:
    from schedulefree import AdamWScheduleFree
    return ScheduleFreeAtRest(AdamWScheduleFree([p for _, p in named]))


#: name -> (factory, the package it needs or None)
PEERS: Dict[str, Tuple[Callable[[Named], object], Optional[str]]] = {
    "adam": (adam, None),
    "adamw": (adamw, None),
    "muon": (muon, None),
    "muon_kj": (muon_kj, None),
    "prodigy": (prodigy, "prodigyopt"),
    "schedulefree": (schedulefree, "schedulefree"),
}


def missing_package(name: str) -> Optional[str]:
    """The package peer ``name`` needs and that is not installed, else None."""
    pkg = PEERS[name][1]
    return pkg if pkg is not None and importlib.util.find_spec(pkg) is None else None


def make_peers(names: Sequence[str], log: Callable[[str], None] = print
               ) -> Dict[str, Callable[[Named], object]]:
    """Factories of the peers ``names`` (in that order); unknown names raise ``ValueError``,
    peers whose optional package is missing are skipped with a one-line message to ``log``."""
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"Invalid peer{'s' if len(bad) > 1 else ''}: "
                         f"{', '.join(map(repr, bad))} (known: {', '.join(PEERS)})")
    out = {}
    for n in dict.fromkeys(names):
        pkg = missing_package(n)
        if pkg is not None:
            log(f"peer {n} skipped: package {pkg!r} is not installed (pip install {pkg})")
            continue
        out[n] = PEERS[n][0]
    return out
