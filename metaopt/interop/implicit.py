"""Implicit meta-gradients (``torchopt.diff.implicit``) for inner problems with an optimality
condition, as an additional estimator beside metaopt's unrolled ones.

When the inner loop runs to convergence, ``w*(lam) = argmin_w L_train(w, lam)`` satisfies
``grad_w L_train(w*, lam) = 0``, and the implicit function theorem gives
``d w*/d lam = -H^{-1} d(grad_w L_train)/d lam``: the meta-gradient costs one linear solve
(conjugate gradient on Hessian-vector products) instead of backpropagating through every
inner step, and its memory does not grow with the number of inner steps.

:func:`regularized_fit` is the worked case: per-feature L2 regularization ``exp(log_lam)`` of
ridge or logistic regression, meta-learned on a validation loss.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor

__all__ = ["implicit_solver", "train_loss", "regularized_fit", "unrolled_fit"]


def train_loss(w: Tensor, log_lam: Tensor, x: Tensor, y: Tensor, kind: str = "ridge") -> Tensor:
    """Inner objective: data loss + 0.5 * sum_j exp(log_lam_j) w_j^2 (w: [features])."""
    z = x @ w
    if kind == "ridge":
        data = 0.5 * ((z - y) ** 2).mean()
    elif kind == "logistic":
        data = F.binary_cross_entropy_with_logits(z, y)
    else:
        raise ValueError(f"Invalid kind: {kind!r} (use 'ridge' or 'logistic')")
    return data + 0.5 * (torch.exp(log_lam) * w * w).sum()


def implicit_solver(inner_solve: Callable[[Tensor, Tensor], Tensor],
                    objective: Callable[[Tensor, Tensor], Tensor], maxiter: int = 100,
                    ridge: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``inner_solve(w0, meta) -> w*`` so gradients w.r.t. ``meta`` come from the implicit
    function theorem at ``grad_w objective(w*, meta) = 0`` (torchopt's ``custom_root`` with a
    CG solve of the Hessian system); ``inner_solve`` itself runs without a graph."""

    def optimality(w, meta):  # torchopt differentiates this with torch.func: keep it functional
        return torch.func.grad(objective)(w, meta)

    solve = torchopt.linear_solve.solve_cg(maxiter=maxiter, ridge=ridge or None)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w0, meta):
        with torch.no_grad():
            return inner_solve(w0, meta.detach())

    return solver


def _gd(objective, w0, meta, steps, lr):
    w = w0.detach().clone()
    for _ in range(steps):
        with torch.enable_grad():
            w = w.requires_grad_()
            (g,) = torch.autograd.grad(objective(w, meta), w)
        w = (w - lr * g).detach()
    return w


def regularized_fit(log_lam: Tensor, x: Tensor, y: Tensor, kind: str = "ridge",
                    steps: int = 500, lr: float = 0.5, maxiter: int = 100) -> Tensor:
    """``w*(log_lam)`` by ``steps`` of gradient descent, differentiable w.r.t. ``log_lam`` by
    the implicit function theorem (the descent itself is not recorded)."""
    def objective(w, meta):
        return train_loss(w, meta, x, y, kind)
    solver = implicit_solver(lambda w0, meta: _gd(objective, w0, meta, steps, lr), objective, maxiter)
    return solver(x.new_zeros(x.shape[1]), log_lam)


def unrolled_fit(log_lam: Tensor, x: Tensor, y: Tensor, kind: str = "ridge", steps: int = 500,
                 lr: float = 0.5, w0: Optional[Tensor] = None) -> Tensor:
    """The same descent, recorded: backpropagation through every step (the reference)."""
    w = x.new_zeros(x.shape[1]) if w0 is None else w0
    w = w.requires_grad_() if not w.requires_grad else w
    for _ in range(steps):
        (g,) = torch.autograd.grad(train_loss(w, log_lam, x, y, kind), w, create_graph=True)
        w = w - lr * g
    return w
