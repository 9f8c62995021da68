r"""Hypergradient descent (Baydin, Cornish, Martínez Rubio, Schmidt, Wood; ICLR 2018).

The learning rate :math:`\alpha` of each parameter group takes its own gradient step. The
parameters after step :math:`t-1` are :math:`\theta_{t-1} = \theta_{t-2} + \alpha\,u_{t-1}`
with :math:`u_{t-1}` the base optimizer's (negative) step direction, so the hypergradient of
the current loss is :math:`h_t = \partial f(\theta_{t-1}) / \partial\alpha =
\nabla f(\theta_{t-1}) \cdot u_{t-1}` and

.. math::
    \alpha_t = \alpha_{t-1} - \beta\, h_t, \qquad \theta_t = \theta_{t-1} + \alpha_t\, u_t .

:math:`u_0 = 0`, so the first step uses :math:`\alpha_0`. The dot product runs over all
parameters of a group; the adapted rate lives in ``group["lr"]`` (so it is saved with
``state_dict`` and visible to LR schedulers and loggers). Computing :math:`h_t` needs one
host sync per group per step (``group["lr"]`` is a Python float).

References:
    A. G. Baydin, R. Cornish, D. Martínez Rubio, M. Schmidt, F. Wood. *Online Learning Rate
    Adaptation with Hypergradient Descent.* ICLR 2018. https://arxiv.org/abs/1703.04782
    (code: https://github.com/gbaydin/hypergradient-descent)
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SGDHD", "AdamHD"]


def _check_common(lr, hypergrad_lr, weight_decay):
    if not isinstance(lr, (int, float)) or not lr >= 0.0:
        raise ValueError(f"Invalid lr (learning rate): {lr}")
    if not isinstance(hypergrad_lr, (int, float)) or not hypergrad_lr >= 0.0:
        raise ValueError(f"Invalid hypergrad_lr: {hypergrad_lr}")
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay}")


class SGDHD(Optimizer):
    r"""SGD with hypergradient descent on the learning rate (SGD-HD; SGDN-HD with Nesterov).

    With :math:`g_t = \nabla f(\theta_{t-1})` (plus ``weight_decay`` :math:`\cdot\theta_{t-1}`)
    and the direction :math:`d_t` of ``torch.optim.SGD`` (:math:`d_t = g_t` without momentum;
    :math:`b_t = \mu b_{t-1} + (1-\tau) g_t`, :math:`d_t = b_t`, or
    :math:`d_t = g_t + \mu b_t` with Nesterov):

    .. math::
        \alpha_t = \alpha_{t-1} + \beta\, g_t \cdot d_{t-1}, \qquad
        \theta_t = \theta_{t-1} - \alpha_t\, d_t , \qquad d_0 = 0 .

    Args:
        params: parameters or parameter groups (each group adapts its own ``lr``).
        lr: initial learning rate :math:`\alpha_0` (default 1e-3, the paper's experiments).
        momentum, dampening, weight_decay, nesterov: as :class:`torch.optim.SGD`.
        hypergrad_lr: hypergradient learning rate :math:`\beta` (default 1e-6, the authors'
            package's default; the paper's experiments use 1e-3). :math:`h_t` scales with the
            squared gradient, so a safe :math:`\beta` depends on the problem: with 1e-3,
            PyTorch's small quadratic test problem (``tests/test_conformity.py``) diverges to
            NaN within 4 steps; with 1e-6 it converges.

    The adapted rate is kept non-negative (:math:`\alpha_t \leftarrow \max(\alpha_t, 0)`): a
    negative rate would be gradient ascent. The paper's rule never needs the guard when it
    converges; it only stops a divergent run from turning into an ascent.

    References: see :mod:`metaopt.optim.hypergradient`.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, hypergrad_lr: float = 1e-6):
        _check_common(lr, hypergrad_lr, weight_decay)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        if not isinstance(dampening, (int, float)) or not 0.0 <= dampening <= 1.0:
            raise ValueError(f"Invalid dampening: {dampening}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Invalid nesterov: {nesterov} (Nesterov momentum requires a "
                             f"momentum and zero dampening)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, hypergrad_lr=hypergrad_lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, tau, wd = group["momentum"], group["dampening"], group["weight_decay"]
            items = []
            h = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if "prev_direction" in state:
                    dot = torch.dot(g.reshape(-1), state["prev_direction"].reshape(-1))
                    h = dot if h is None else h + dot
                items.append((p, g, state))
            if h is not None:
                group["lr"] = max(0.0, group["lr"] + group["hypergrad_lr"] * float(h))
            lr = group["lr"]
            for p, g, state in items:
                if mu != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(mu).add_(g, alpha=1.0 - tau)
                    d = g.add(buf, alpha=mu) if group["nesterov"] else buf
                else:
                    d = g
                state["prev_direction"] = d.detach().clone()
                p.add_(d, alpha=-lr)
        return loss


class AdamHD(Optimizer):
    r"""Adam with hypergradient descent on the learning rate (Adam-HD).

    With :math:`g_t = \nabla f(\theta_{t-1})` (plus ``weight_decay`` :math:`\cdot\theta_{t-1}`,
    L2 as in :class:`torch.optim.Adam`) and Adam's bias-corrected direction
    :math:`u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)`:

    .. math::
        \alpha_t &= \alpha_{t-1} + \beta\, g_t \cdot u_{t-1}, \qquad u_0 = 0 \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \alpha_t\, \frac{m_t / (1 - \beta_1^t)}
                    {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    With ``hypergrad_lr=0`` this is exactly :class:`torch.optim.Adam`. :math:`u_{t-1}` is
    recomputed from the stored moments (no extra buffer); unlike the authors' code, the
    learning rate is updated once per group from the full dot product before any parameter
    moves, and :math:`\epsilon` sits where Adam puts it.

    Args:
        params: parameters or parameter groups (each group adapts its own ``lr``).
        lr: initial learning rate :math:`\alpha_0` (default 1e-3).
        betas, eps, weight_decay: as :class:`torch.optim.Adam`.
        hypergrad_lr: :math:`\beta` (default 1e-7, the paper's value for Adam-HD on logistic
            regression and the MLP; it used 1e-8 for VGG). The rate is kept non-negative, as in
            :class:`SGDHD`.

    References: see :mod:`metaopt.optim.hypergradient`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, hypergrad_lr: float = 1e-7):
        _check_common(lr, hypergrad_lr, weight_decay)
        if not isinstance(eps, (int, float)) or not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Invalid betas: {betas!r} (expected two floats)")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid betas[0] (beta1): {b1}")
        if not 0.0 <= b2 < 1.0:
            raise ValueError(f"Invalid betas[1] (beta2): {b2}")
        defaults = dict(lr=lr, betas=(float(b1), float(b2)), eps=eps, weight_decay=weight_decay,
                        hypergrad_lr=hypergrad_lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            eps, wd = group["eps"], group["weight_decay"]
            items = []
            h = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamHD does not support sparse gradients")
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s = state["step"]
                if s > 0:
                    u = (state["exp_avg"] / (1 - b1 ** s)) / (
                        (state["exp_avg_sq"] / (1 - b2 ** s)).sqrt_().add_(eps))
                    dot = torch.dot(g.reshape(-1), u.reshape(-1))
                    h = dot if h is None else h + dot
                items.append((p, g, state))
            if h is not None:
                group["lr"] = max(0.0, group["lr"] + group["hypergrad_lr"] * float(h))
            lr = group["lr"]
            for p, g, state in items:
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bc1)
        return loss
