r"""Hypergradient descent (Baydin et al. 2018) as rules: ``sgd_hd`` and ``adam_hd``.

The learning rate adapts online, :math:`\alpha_t = \alpha_{t-1} + \beta\, g_t \cdot u_{t-1}`
(:math:`u_{t-1}` the previous step's descent direction, :math:`u_0 = 0`), and the step is
:math:`-\alpha_t u_t`; see :mod:`metaopt.optim.hypergradient` for the derivation. Here the
initial rate and the hypergradient rate are meta-parameters, so meta-training can learn them:

theta: ``log_lr0`` (scalar, :math:`\log\alpha_0`), ``log_beta`` (scalar, :math:`\log\beta`).
state: ``lr`` (scalar, the adapted :math:`\alpha_{t}`; read only after the first step, which
uses :math:`\exp(\text{log\_lr0})`), ``step``, and the direction / moments over the flat
parameter vector (``dir`` and ``buf`` for sgd_hd; ``m``, ``v`` for adam_hd).

Both are a direction (:class:`~metaopt.rules.compose.Momentum`,
:class:`~metaopt.rules.compose.AdamDirection`) chained with
:class:`~metaopt.rules.compose.HypergradientLR` (:mod:`metaopt.rules.compose`).
One learning rate covers all parameters (one parameter group). Both rules match
:class:`metaopt.optim.SGDHD` / :class:`metaopt.optim.AdamHD` step for step.
"""
from __future__ import annotations

from metaopt.rules.base import register_rule
from metaopt.rules.compose import AdamDirection, Chain, HypergradientLR, Momentum


def _check(lr0, beta):
    if not isinstance(lr0, (int, float)) or not lr0 > 0:
        raise ValueError(f"Invalid lr0: {lr0} (expected lr0 > 0; it is learned as a log)")
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"Invalid beta: {beta} (expected beta > 0; it is learned as a log)")


@register_rule
class SGDHDRule(Chain):
    """SGD-HD (``momentum > 0``: SGD with heavy-ball momentum, direction = momentum buffer)."""

    name = "sgd_hd"

    def __init__(self, lr0: float = 1e-3, beta: float = 1e-3, momentum: float = 0.0):
        _check(lr0, beta)
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}")
        self.lr0, self.beta, self.momentum = float(lr0), float(beta), float(momentum)
        self.direction = Momentum(self.momentum, keep_buffer=False, remember=True)
        self.scale = HypergradientLR(self.lr0, self.beta)

    def config(self):
        return dict(lr0=self.lr0, beta=self.beta, momentum=self.momentum)


@register_rule
class AdamHDRule(Chain):
    """Adam-HD: Adam (epsilon after bias correction, as torch) with a hypergradient-adapted rate."""

    name = "adam_hd"

    def __init__(self, lr0: float = 1e-3, beta: float = 1e-7, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8):
        _check(lr0, beta)
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        self.lr0, self.beta = float(lr0), float(beta)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.direction = AdamDirection(self.beta1, self.beta2, self.eps)
        self.scale = HypergradientLR(self.lr0, self.beta)

    def config(self):
        return dict(lr0=self.lr0, beta=self.beta, beta1=self.beta1, beta2=self.beta2,
                    eps=self.eps)
