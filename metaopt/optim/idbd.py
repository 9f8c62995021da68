r"""IDBD (Sutton 1992) and Autostep (Mahmood, Sutton, Degris, Pilarski 2012) for linear models.

Both adapt one step size per weight of a linear least-squares learner :math:`y = w^\top x (+ b)`
from the correlation of successive updates. Both need the squared inputs :math:`x_i^2` (the
diagonal of the loss Hessian), which the gradient alone does not give, so :meth:`step` takes the
input batch: ``opt.step(inputs=x)``. The loss must be half the squared error, summed over
outputs and averaged over the batch::

    loss = 0.5 * ((model(x) - y) ** 2).sum(-1).mean()

so that :math:`\delta x_i = -\partial L/\partial w_i` and the Hessian diagonal is
:math:`\overline{x_i^2}` (batch mean; 1 for a bias). With one example per step this is exactly
the published algorithm; with a batch it is its natural minibatch extension.

Each parameter group must be a linear layer, ``[weight]`` or ``[weight, bias]`` in that order
(what ``nn.Linear(n, m).parameters()`` yields), with ``weight`` of shape ``[in]`` or
``[out, in]``.

These are not in ``conf/optimizer``: for a general (nonlinear) model there is no cheap exact
:math:`x_i^2`, and replacing it by a Hessian-diagonal estimate would be a different algorithm.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["IDBD", "Autostep"]


class _LinearStepSizeOptimizer(Optimizer):
    """Shared checks and the per-coordinate curvature of a linear layer."""

    def _check_groups(self):
        for gi, group in enumerate(self.param_groups):
            ps = group["params"]
            if len(ps) not in (1, 2) or ps[0].dim() not in (1, 2):
                raise ValueError(f"{type(self).__name__}: param group {gi} must be [weight] or "
                                 f"[weight, bias] of one linear layer (weight [in] or [out, in]); "
                                 f"got shapes {[tuple(p.shape) for p in ps]}")
            if len(ps) == 2:
                w, b = ps
                n_out = w.shape[0] if w.dim() == 2 else 1
                if b.numel() != n_out:
                    raise ValueError(f"{type(self).__name__}: param group {gi}: bias of shape "
                                     f"{tuple(b.shape)} does not fit weight {tuple(w.shape)}")

    def _curvatures(self, group, inputs: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """[(param, Hessian diagonal broadcastable to param)] for params with a gradient."""
        ps = group["params"]
        w = ps[0]
        n_in = w.shape[-1]
        if inputs.shape[-1] != n_in:
            raise ValueError(f"{type(self).__name__}.step: inputs have {inputs.shape[-1]} "
                             f"features, the weight expects {n_in}")
        xsq = inputs.detach().reshape(-1, n_in).to(w.dtype).square().mean(0)
        out = []
        if w.grad is not None:
            out.append((w, xsq))
        if len(ps) == 2 and ps[1].grad is not None:
            out.append((ps[1], torch.ones((), dtype=ps[1].dtype, device=ps[1].device)))
        return out

    def _prologue(self, closure, inputs):
        if inputs is None:
            raise ValueError(f"{type(self).__name__}.step needs inputs=<input batch of the "
                             f"linear layer> to form the squared inputs x_i^2")
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None


class IDBD(_LinearStepSizeOptimizer):
    r"""Incremental Delta-Bar-Delta: meta-gradient descent on log step sizes (Sutton 1992).

    With :math:`\delta = y^* - y` and one log step size :math:`\beta_i` per weight:

    .. math::
        \beta_i &\leftarrow \beta_i + \theta\, \delta x_i h_i, \qquad
        \alpha_i = e^{\beta_i} \\
        w_i &\leftarrow w_i + \alpha_i\, \delta x_i \\
        h_i &\leftarrow h_i \left[1 - \alpha_i x_i^2\right]^+ + \alpha_i\, \delta x_i

    :math:`h_i` traces the effect of past :math:`\beta_i` on :math:`w_i`; relevant inputs, whose
    updates keep pointing the same way, get larger step sizes.

    Args:
        params: a linear layer's ``[weight]`` or ``[weight, bias]`` (or groups of such).
        lr: initial step size :math:`\alpha_i = e^{\beta_i}` (default 0.05).
        meta_lr: meta step size :math:`\theta` (default 0.01; Sutton studies a range of
            values, the best depending on the task and the input scale).

    Per-parameter state: ``beta`` (log step sizes) and ``h``; :meth:`step_sizes` returns
    :math:`\alpha`. Call as ``opt.step(inputs=x)`` after ``backward()``, or
    ``opt.step(closure, inputs=x)``.

    Reference:
        R. S. Sutton. *Adapting Bias by Gradient Descent: An Incremental Version of
        Delta-Bar-Delta.* AAAI 1992.
    """

    def __init__(self, params, lr: float = 0.05, meta_lr: float = 0.01):
        if not isinstance(lr, (int, float)) or not lr > 0.0:
            raise ValueError(f"Invalid lr (learning rate): {lr} (IDBD needs lr > 0)")
        if not isinstance(meta_lr, (int, float)) or not meta_lr >= 0.0:
            raise ValueError(f"Invalid meta_lr: {meta_lr}")
        super().__init__(params, dict(lr=lr, meta_lr=meta_lr))
        self._check_groups()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,
             inputs: Optional[Tensor] = None):
        loss = self._prologue(closure, inputs)
        for group in self.param_groups:
            theta = group["meta_lr"]
            for p, xsq in self._curvatures(group, inputs):
                st = self.state[p]
                if not st:
                    st["beta"] = torch.full_like(p, math.log(group["lr"]))
                    st["h"] = torch.zeros_like(p)
                beta, h = st["beta"], st["h"]
                dx = -p.grad                                    # delta * x_i
                beta.addcmul_(dx, h, value=theta)
                alpha = beta.exp()
                p.add_(alpha * dx)
                h.mul_((1 - alpha * xsq).clamp_(min=0)).add_(alpha * dx)
        return loss

    def step_sizes(self, p: Tensor) -> Optional[Tensor]:
        st = self.state.get(p)
        return st["beta"].exp() if st else None


class Autostep(_LinearStepSizeOptimizer):
    r"""Autostep: IDBD with normalised meta-steps and an overshoot bound (Mahmood et al. 2012).

    .. math::
        v_i &\leftarrow \max\!\big(|\delta x_i h_i|,\;
            v_i + \tfrac{1}{\tau} \alpha_i x_i^2 (|\delta x_i h_i| - v_i)\big) \\
        \alpha_i &\leftarrow \alpha_i \exp\!\big(\mu\, \delta x_i h_i / v_i\big)
            \quad (\text{if } v_i \neq 0) \\
        M &= \max\!\big(\textstyle\sum_i \alpha_i x_i^2,\ 1\big), \qquad
        \alpha_i \leftarrow \alpha_i / M \\
        w_i &\leftarrow w_i + \alpha_i\, \delta x_i, \qquad
        h_i \leftarrow h_i (1 - \alpha_i x_i^2) + \alpha_i\, \delta x_i

    The sum for :math:`M` runs over the inputs of each output unit (its weight row and bias),
    so one update never overshoots that unit's target.

    Args:
        params: a linear layer's ``[weight]`` or ``[weight, bias]`` (or groups of such).
        lr: initial step size :math:`\alpha_i` (default 0.1).
        meta_lr: :math:`\mu` (default 0.01, the paper's).
        tau: :math:`\tau` (default 1e4, the paper's).

    Reference:
        A. R. Mahmood, R. S. Sutton, T. Degris, P. M. Pilarski. *Tuning-free step-size
        adaptation.* ICASSP 2012.
    """

    def __init__(self, params, lr: float = 0.1, meta_lr: float = 0.01, tau: float = 1e4):
        if not isinstance(lr, (int, float)) or not lr > 0.0:
            raise ValueError(f"Invalid lr (learning rate): {lr} (Autostep needs lr > 0)")
        if not isinstance(meta_lr, (int, float)) or not meta_lr >= 0.0:
            raise ValueError(f"Invalid meta_lr: {meta_lr}")
        if not isinstance(tau, (int, float)) or not tau >= 1.0:
            raise ValueError(f"Invalid tau: {tau} (expected tau >= 1)")
        super().__init__(params, dict(lr=lr, meta_lr=meta_lr, tau=tau))
        self._check_groups()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,
             inputs: Optional[Tensor] = None):
        loss = self._prologue(closure, inputs)
        for group in self.param_groups:
            mu, tau = group["meta_lr"], group["tau"]
            items = []
            for p, xsq in self._curvatures(group, inputs):
                st = self.state[p]
                if not st:
                    st["alpha"] = torch.full_like(p, group["lr"])
                    st["h"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                alpha, h, v = st["alpha"], st["h"], st["v"]
                dx = -p.grad
                dxh = dx * h
                v.copy_(torch.maximum(dxh.abs(), v + alpha * xsq * (dxh.abs() - v) / tau))
                safe_v = torch.where(v != 0, v, torch.ones_like(v))
                alpha.mul_(torch.where(v != 0, torch.exp(mu * dxh / safe_v),
                                       torch.ones_like(v)))
                items.append((p, xsq, dx))
            # M per output unit: a weight row [out, in] sums over in; a bias adds alpha * 1.
            weight = group["params"][0]
            per_unit = None
            for p, xsq, _ in items:
                ax = self.state[p]["alpha"] * xsq
                s = ax.sum(-1).reshape(-1) if p is weight else ax.reshape(-1)
                per_unit = s if per_unit is None else per_unit + s
            m = per_unit.clamp(min=1.0) if items else None
            for p, xsq, dx in items:
                alpha, h = self.state[p]["alpha"], self.state[p]["h"]
                if p is weight:
                    alpha.div_(m.unsqueeze(-1) if p.dim() == 2 else m.reshape(()))
                else:
                    alpha.div_(m.reshape(alpha.shape))
                p.add_(alpha * dx)
                h.mul_(1 - alpha * xsq).add_(alpha * dx)
        return loss

    def step_sizes(self, p: Tensor) -> Optional[Tensor]:
        st = self.state.get(p)
        return st["alpha"].clone() if st else None
