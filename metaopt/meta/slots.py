"""Persistent inner runs ("slots") of a truncated meta-training meta-batch.

Each of the K slots holds one task's inner run: its fast weights, rule state, step counter,
horizon and the generator its batches come from. A scheme advances every slot by one window
(truncation) per outer step; the inner state carries across truncations and a slot is reset
with a fresh task when it reaches its horizon. Everything a slot holds is a tensor or an int,
so a checkpoint stores it exactly (the task is rebuilt from its integer seed).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict

import torch
from torch import Tensor

from metaopt.tasks.base import Task, TaskFamily
from metaopt.types import Params, State


@dataclass
class Slot:
    task: Task
    seed: int
    params: Params
    state: State
    gen: torch.Generator
    step: int = 0
    horizon: int = 0
    extra: Dict[str, Tensor] = field(default_factory=dict)  # scheme-owned carried tensors

    @property
    def done(self) -> bool:
        return self.step >= self.horizon

    def advanced(self, out, steps: int) -> "Slot":
        """A new slot ``steps`` inner steps on: ``out``'s params, state and extra (an UnrollOut).
        The batch generator is shared: drawing the window already advanced it."""
        return replace(self, params=out.params, state=out.state, extra=dict(out.extra),
                       step=self.step + int(steps))


def new_slot(family: TaskFamily, rule, seed: int, horizon: int, dtype=None) -> Slot:
    task = family.sample_seeded(seed)
    gen = torch.Generator().manual_seed(int(seed))
    params = task.init_params(gen)
    if dtype is not None:
        params = {k: v.to(dtype) for k, v in params.items()}
    return Slot(task=task, seed=int(seed), params=params, state=rule.init(params), gen=gen,
                step=0, horizon=int(horizon))
