r"""Stagewise locally-regularized Lookahead, SLRLA (Zhou, Yan, Yuan, Feng, Yan; NeurIPS 2021)."""
from __future__ import annotations

import bisect
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from metaopt.optim.lookahead import Lookahead

__all__ = ["SLRLA"]


class SLRLA(Lookahead):
    r"""Lookahead whose inner loop minimises the loss plus a pull towards the slow weights,
    with the learning rate decayed stagewise.

    Between two synchronisations the inner optimizer :math:`A` descends the locally
    regularized objective (the authors' code adds :math:`\beta \lVert w - \phi \rVert_2^2`,
    a sum of squares, to the loss), then the slow weights interpolate as in :class:`Lookahead`:

    .. math::
        \theta_{t,i} &= \theta_{t,i-1} + A\big(\nabla L(\theta_{t,i-1})
            + 2\beta\,(\theta_{t,i-1} - \phi_{t-1})\big), \qquad i = 1, \dots, k \\
        \phi_t &= \phi_{t-1} + \alpha\,(\theta_{t,k} - \phi_{t-1}), \qquad
        \theta_{t+1,0} = \phi_t

    and the learning rate of every parameter group follows a stagewise (multi-step) schedule,
    :math:`\eta_s = \eta_0\,\gamma^{s}` in stage :math:`s` (the number of milestones passed),
    as ``torch.optim.lr_scheduler.MultiStepLR`` with milestones counted in calls of
    :meth:`step`. The decay multiplies ``group["lr"]`` when a milestone is reached, so it
    composes with other schedulers.

    Args:
        params, inner, k, alpha, pullback_momentum, **inner_kwargs: as :class:`Lookahead`
            (defaults ``k=5, alpha=0.8`` as in the authors' runs).
        beta: strength of the local regularizer (default 0.2, the authors' runs).
        milestones: increasing step counts at which the learning rate is multiplied by
            ``gamma``; or fractions in (0, 1) of ``total_steps`` (the authors decay at
            0.3, 0.6 and 0.8 of training). Default: no decay.
        gamma: decay factor per milestone in (0, 1] (default 0.2, the authors').
        total_steps: total number of calls of :meth:`step`, needed for fractional milestones.

    The closure (if given) is called here, before the regularizer is added to the gradients;
    the inner optimizer's ``step`` is then called without one. The regularized gradient is
    passed as a new tensor for the duration of the inner step; ``p.grad`` itself is not written.

    References:
        P. Zhou, H. Yan, X. Yuan, J. Feng, S. Yan. *Towards Understanding Why Lookahead
        Generalizes Better Than SGD and Beyond.* NeurIPS 2021.
        https://proceedings.neurips.cc/paper/2021/hash/e53a0a2978c28872a4505bdb51db06dc-Abstract.html
        (code: https://github.com/sail-sg/SLRLA-optimizer)
    """

    def __init__(self, params=None, inner=None, *, k: int = 5, alpha: float = 0.8,
                 beta: float = 0.2, milestones: Sequence[float] = (), gamma: float = 0.2,
                 total_steps: Optional[int] = None, pullback_momentum: str = "none",
                 **inner_kwargs):
        if not isinstance(beta, (int, float)) or not beta >= 0.0:
            raise ValueError(f"Invalid beta: {beta} (expected beta >= 0)")
        if not isinstance(gamma, (int, float)) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma} (expected 0 < gamma <= 1)")
        if total_steps is not None and (isinstance(total_steps, bool)
                                        or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"Invalid total_steps: {total_steps} (expected an integer >= 1)")
        steps = _milestone_steps(milestones, total_steps)
        super().__init__(params, inner, k=k, alpha=alpha, pullback_momentum=pullback_momentum,
                         **inner_kwargs)
        own = dict(beta=float(beta), milestones=steps, gamma=float(gamma))
        self.defaults.update(own)
        self._own_defaults.update(own)
        self._counters["step"] = 0

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._init_slow()
        t = self._counters["step"]
        milestones, gamma = self._own_defaults["milestones"], self._own_defaults["gamma"]
        n = bisect.bisect_right(milestones, t) - bisect.bisect_left(milestones, t)
        if n:
            for group in self.param_groups:
                group["lr"] = group["lr"] * gamma ** n
        beta = self._own_defaults["beta"]
        # The regularized gradient is handed to the inner optimizer as a new tensor, and the
        # caller's .grad tensors are put back afterwards: like torch.optim, .grad is never written.
        swapped = []
        if beta:
            with torch.no_grad():
                for p in self._params():
                    if p.grad is not None:
                        g = p.grad
                        p.grad = g + 2.0 * beta * (p.detach() - self.state[p]["slow_param"])
                        swapped.append((p, g))
        try:
            self.optimizer.step()
        finally:
            for p, g in swapped:
                p.grad = g
        self._counters["step"] = t + 1
        self._after_inner_step()
        return loss


def _milestone_steps(milestones, total_steps):
    try:
        ms = [float(m) for m in milestones]
    except (TypeError, ValueError):
        raise ValueError(f"Invalid milestones: {milestones!r} (expected a sequence of numbers)")
    if any(m <= 0 for m in ms) or ms != sorted(ms):
        raise ValueError(f"Invalid milestones: {list(milestones)} (expected increasing positive "
                         f"step counts, or fractions of total_steps)")
    fractional = [m for m in ms if m < 1.0 or m != int(m)]
    if fractional:
        if len(fractional) != len(ms) or any(m >= 1.0 for m in ms):
            raise ValueError(f"Invalid milestones: {list(milestones)} (mix of fractions and step "
                             f"counts)")
        if total_steps is None:
            raise ValueError(f"Invalid milestones: {list(milestones)} are fractions, which need "
                             f"total_steps")
        return [int(round(m * total_steps)) for m in ms]
    return [int(m) for m in ms]
