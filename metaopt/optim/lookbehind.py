r"""Lookbehind-SAM / Lookbehind-ASAM (Mordido, Malviya, Baratin, Chandar, ICML 2024)."""
from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.optim.lookahead import WrapperOptimizer, build_inner

__all__ = ["Lookbehind"]

_VARIANTS = ("sam", "asam")


class Lookbehind(WrapperOptimizer):
    r"""Lookbehind: *k* sharpness-aware ascent steps back, one interpolated step forward.

    Each call of :meth:`step` is one outer iteration on one minibatch (the closure). Starting
    from the slow weights :math:`\phi_{t-1}`, the perturbed weights :math:`\tilde\phi` climb
    :math:`k` SAM ascent steps of radius :math:`\rho`, and the descent gradient taken at each
    perturbed point moves the fast weights :math:`\phi_{t,i}` through the inner optimizer
    :math:`A` (plain SGD shown); the slow weights then interpolate:

    .. math::
        \tilde\phi_{t,0} &= \phi_{t,0} = \phi_{t-1} \\
        \epsilon_{t,i} &= \rho\, \frac{T^2_{\tilde\phi}\, \nabla L(\tilde\phi_{t,i-1})}
            {\lVert T_{\tilde\phi}\, \nabla L(\tilde\phi_{t,i-1}) \rVert_2}, \qquad
        \tilde\phi_{t,i} = \tilde\phi_{t,i-1} + \epsilon_{t,i} \\
        \phi_{t,i} &= \phi_{t,i-1} - \eta\, \nabla L(\tilde\phi_{t,i}), \qquad i = 1, \dots, k \\
        \phi_t &= \phi_{t-1} + \alpha\,(\phi_{t,k} - \phi_{t-1})

    SAM uses :math:`T = I`; ASAM (Kwon et al. 2021) the element-wise
    :math:`T_w = |w| + \eta_{\text{asam}}` on weight tensors and :math:`T = 1` on biases.
    Which tensors are "weights" follows the authors' code (``'weight' in name``) when the
    parameters were given with names (``model.named_parameters()``); without names, tensors
    with two or more dimensions count as weights (so norm-layer gains are treated as biases).

    Adaptive :math:`\alpha` (``alpha="adaptive"``) sets, per parameter tensor,
    :math:`\alpha = (\cos(\phi_{t,1} - \phi_{t-1},\ \phi_{t,k} - \phi_{t-1}) + 1)/2`: the
    alignment of the first and the combined descent steps (with :math:`k = 1` this is 1).

    Cost: :math:`2k` closure evaluations per step, as in the authors' code (one ascent and one
    descent gradient per inner step). With :math:`k = 1,\ \rho = 0` the method is
    Lookahead with :math:`k = 1` over the inner optimizer.

    Args:
        params: parameters / parameter groups (named parameters enable ASAM's weight/bias
            split), or an inner :class:`~torch.optim.Optimizer` instance.
        inner: callable ``params -> Optimizer`` (default :class:`torch.optim.SGD`) or instance.
        k: ascent/descent steps per outer step (default 2, the authors' recommended setting).
        alpha: slow-weight step size in :math:`(0, 1]`, or ``"adaptive"`` (default 0.5).
        rho: neighbourhood radius (default 0.05, SAM's; the authors use 0.5 for ASAM).
        variant: ``"sam"`` or ``"asam"``.
        eta: ASAM's :math:`\eta` in :math:`T_w = |w| + \eta` (default 0.01).
        **inner_kwargs: forwarded to ``inner`` (e.g. ``lr``, ``momentum``).

    :meth:`step` needs a closure that zeroes the gradients, computes the loss on the current
    minibatch, calls ``backward()`` and returns the loss; it returns the loss at
    :math:`\phi_{t-1}`.

    References:
        G. Mordido, P. Malviya, A. Baratin, S. Chandar. *Lookbehind-SAM: k steps back, 1 step
        forward.* ICML 2024. https://arxiv.org/abs/2307.16704 (code:
        https://github.com/chandar-lab/Lookbehind-SAM)

        J. Kwon, J. Kim, H. Park, I. K. Choi. *ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks.* ICML 2021.
    """

    def __init__(self, params=None, inner=None, *, k: int = 2,
                 alpha: Union[float, str] = 0.5, rho: float = 0.05, variant: str = "sam",
                 eta: float = 0.01, **inner_kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k} (expected an integer >= 1)")
        if isinstance(alpha, str):
            if alpha != "adaptive":
                raise ValueError(f"Invalid alpha: {alpha!r} (expected a float in (0, 1] "
                                 f"or 'adaptive')")
        elif not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha} (expected 0 < alpha <= 1 or 'adaptive')")
        if not isinstance(rho, (int, float)) or not rho >= 0.0:
            raise ValueError(f"Invalid rho: {rho} (expected rho >= 0)")
        if variant not in _VARIANTS:
            raise ValueError(f"Invalid variant: {variant!r} (expected one of {_VARIANTS})")
        if not isinstance(eta, (int, float)) or not eta >= 0.0:
            raise ValueError(f"Invalid eta: {eta} (expected eta >= 0)")
        opt = build_inner(params, inner, inner_kwargs, type(self).__name__)
        alpha = alpha if isinstance(alpha, str) else float(alpha)
        super().__init__(opt, dict(k=k, alpha=alpha, rho=float(rho), variant=variant,
                                   eta=float(eta)))
        #: the alphas used at the last step, one per parameter (diagnostics for "adaptive")
        self.last_alphas: List[float] = []

    def _is_weight(self, group, i: int, p: Tensor) -> bool:
        names = group.get("param_names")
        if names is not None:
            return "weight" in names[i]
        return p.dim() >= 2

    @torch.no_grad()
    def _ascent(self, params: List[Tensor]) -> None:
        """Move every parameter by its share of the ascent step, in place."""
        rho, asam, eta = self._own_defaults["rho"], self._own_defaults["variant"] == "asam", \
            self._own_defaults["eta"]
        scaled = []  # (p, T * g, T or None)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if asam and self._is_weight(group, i, p):
                    t = p.detach().abs().add_(eta)
                    scaled.append((p, p.grad * t, t))
                else:
                    scaled.append((p, p.grad, None))
        if not scaled:
            return
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(tg) for _, tg, _ in scaled])) + 1e-16
        scale = rho / norm
        for p, tg, t in scaled:
            p.add_((tg * t if t is not None else tg) * scale)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        if closure is None:
            raise ValueError("Lookbehind.step needs a closure that zeroes grads, computes the "
                             "loss, calls backward() and returns the loss")
        closure = torch.enable_grad()(closure)
        k, alpha = self._own_defaults["k"], self._own_defaults["alpha"]
        first: Optional[List[Tensor]] = None
        loss0 = None
        for i in range(k):
            loss = closure()                  # gradient at the current perturbed point
            if i == 0:
                loss0 = loss
                # parameters without a gradient (frozen, unused) are left alone, as in torch.optim
                params = [p for p in self._params() if p.grad is not None]
                with torch.no_grad():
                    slow = [p.detach().clone() for p in params]
                    fast = [s.clone() for s in slow]
            self._ascent(params)              # perturbed point moves further up
            closure()                         # descent gradient at the new perturbed point
            with torch.no_grad():
                perturbed = [p.detach().clone() for p in params]
                for p, f in zip(params, fast):
                    p.copy_(f)
            self.optimizer.step()             # fast weights take the descent step
            with torch.no_grad():
                for j, (p, q) in enumerate(zip(params, perturbed)):
                    fast[j] = p.detach().clone()
                    p.copy_(q)
            if i == 0 and alpha == "adaptive":
                first = [f.clone() for f in fast]
        with torch.no_grad():
            self.last_alphas = []
            for j, p in enumerate(params):
                if alpha == "adaptive":
                    a = (F.cosine_similarity((first[j] - slow[j]).flatten(),
                                             (fast[j] - slow[j]).flatten(), dim=0) + 1.0) / 2.0
                    a = float(a)
                else:
                    a = alpha
                self.last_alphas.append(a)
                p.copy_(slow[j] + a * (fast[j] - slow[j]))
        return loss0
