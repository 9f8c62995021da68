"""A rule's response surface: its update as a function of the gradient, for several gradient
histories ("momenta") and time steps, measured through the rule's public ``update`` only.

Works for any :class:`metaopt.rules.base.Rule` (learned or hand-designed), with no knowledge of
its internals: one probe tensor holds a grid of coordinates ``(history m_j, gradient g_i)``.
For ``t`` steps every coordinate ``(j, i)`` receives the constant gradient ``m_j`` (so whatever
momenta / second moments / counters the rule keeps hold the history ``m_j``); at step ``t + 1``
it receives ``g_i`` and the update written there is recorded. Parameters are held fixed
(``param_value``) so only the gradient history differs between coordinates.

Rules that normalize per tensor see the whole grid as one tensor, so the surface is the answer
to "within a tensor whose gradients span this range, how does a coordinate's step depend on its
gradient and its history". Rules whose theta depends on the parameter layout
(``spec_dependent``, e.g. LayerwiseLR) need ``params=`` (a template with the layout theta was
trained for) and ``tensor=`` (which tensor to probe); the grid is tiled through that tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ResponseSurface", "response_surface"]


@dataclass
class ResponseSurface:
    grads: np.ndarray      # [G] gradient at the probed step
    momenta: np.ndarray    # [M] constant gradient seen at every earlier step
    steps: np.ndarray      # [S] number of earlier steps
    updates: np.ndarray    # [S, M, G] update written at the probed step
    rule: str = "rule"


def _rule_and_theta(rule, theta):
    if hasattr(rule, "rule") and hasattr(rule, "theta") and isinstance(rule, torch.optim.Optimizer):
        return rule.rule, (theta if theta is not None else rule.theta)
    if theta is None:
        raise ValueError("theta: pass the rule's meta-parameters (or an optimizer with .rule/.theta)")
    return rule, theta


@torch.no_grad()
def response_surface(rule, theta: Optional[Mapping[str, Tensor]] = None,
                     grads: Sequence[float] = tuple(np.linspace(-0.1, 0.1, 41)),
                     momenta: Sequence[float] = (-0.1, -0.05, 0.0, 0.05, 0.1),
                     steps: Sequence[int] = (1, 10, 100),
                     param_value: float = 0.1, loss: float = 1.0,
                     params: Optional[Mapping[str, Tensor]] = None, tensor: Optional[str] = None,
                     ctx: Optional[Mapping] = None, dtype: torch.dtype = torch.float64) -> ResponseSurface:
    """Probe ``rule`` (a Rule with ``theta``, or a ``LearnedOptimizer``) as the module doc says.

    ``loss``: the constant ``ctx["loss"]`` given to loss-aware rules; activation-aware rules get
    zero log-RMS activation statistics unless ``ctx`` is passed (then it is used at every step).
    """
    rule, theta = _rule_and_theta(rule, theta)
    g = torch.as_tensor(np.asarray(grads, dtype=float), dtype=dtype)
    m = torch.as_tensor(np.asarray(momenta, dtype=float), dtype=dtype)
    steps_sorted = sorted(int(s) for s in steps)
    if g.ndim != 1 or len(g) < 2:
        raise ValueError("grads: need >= 2 gradient values")
    if m.ndim != 1 or len(m) < 1:
        raise ValueError("momenta: need >= 1 history value")
    if not steps_sorted or steps_sorted[0] < 0:
        raise ValueError(f"steps: need non-negative step counts, got {list(steps)}")
    n_grid = len(m) * len(g)

    if params is None:
        if getattr(rule, "spec_dependent", False):
            raise ValueError(f"params: rule {rule.name!r} is spec-dependent; pass params= (the layout its "
                             "theta was trained for) and tensor= (the tensor to probe)")
        template = {"weight": torch.empty(len(m), len(g), dtype=dtype)}
        tensor = "weight"
    else:
        template = {k: torch.as_tensor(v).detach().to(dtype) for k, v in params.items()}
        if tensor is None:
            tensor = next((k for k, v in template.items() if v.dim() >= 2), next(iter(template)))
        if tensor not in template:
            raise ValueError(f"tensor: {tensor!r} is not in params (have {', '.join(template)})")
        if template[tensor].numel() < n_grid:
            raise ValueError(f"tensor: {tensor!r} has {template[tensor].numel()} coordinates, the grid "
                             f"needs {n_grid} (fewer grads/momenta, or a larger tensor)")
    p = {k: torch.full_like(v, float(param_value)) for k, v in template.items()}
    shape = template[tensor].shape
    numel = template[tensor].numel()

    def tiled(grid: Tensor) -> Tensor:  # flat [n_grid] pattern repeated through the probe tensor
        reps = -(-numel // n_grid)
        return grid.reshape(-1).repeat(reps)[:numel].reshape(shape)

    hist = {k: torch.zeros_like(v) for k, v in p.items()}
    hist[tensor] = tiled(m[:, None].expand(len(m), len(g)))
    probe = {k: torch.zeros_like(v) for k, v in p.items()}
    probe[tensor] = tiled(g[None, :].expand(len(m), len(g)))

    theta = {k: torch.as_tensor(v).detach().to(dtype) for k, v in theta.items()}
    if ctx is None:
        ctx = {"loss": torch.tensor(float(loss), dtype=dtype),
               "act": {k: torch.zeros(2, dtype=dtype) for k in p} if getattr(rule, "needs_activations", False) else None}
    state = rule.init(p)
    out = np.zeros((len(steps_sorted), len(m), len(g)))
    done = 0
    for si, s in enumerate(steps_sorted):
        while done < s:
            _, state = rule.update(theta, hist, state, p, ctx)
            done += 1
        snapshot = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
        upd, _ = rule.update(theta, probe, snapshot, p, ctx)
        u = upd[tensor].reshape(-1)[:n_grid].reshape(len(m), len(g))
        out[si] = u.double().cpu().numpy()
    return ResponseSurface(grads=g.numpy(), momenta=m.numpy(),  # in the caller's order of steps
                           steps=np.array([int(s) for s in steps]),
                           updates=out[[steps_sorted.index(int(s)) for s in steps]],
                           rule=getattr(rule, "name", type(rule).__name__))
