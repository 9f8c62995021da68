"""Noisy quadratics: the smallest task with controllable curvature and gradient noise.

``loss(w; c) = 0.5 (w - c)^T A (w - c)`` averaged over the batch of targets ``c``. Train
batches draw ``c = w_star + noise * z`` (``z ~ N(0, I)``), so the stochastic gradient is the
true gradient plus noise of covariance ``noise^2 A^2``; valid/test batches are ``c = w_star``,
so their loss is the noise-free suboptimality ``0.5 (w - w_star)^T A (w - w_star)``, which is
zero at ``w_star``. ``A = Q diag(eigs) Q^T`` with a random rotation ``Q`` and eigenvalues
log-spaced from 1 down to ``1 / cond``. ``A`` and ``w_star`` are module buffers, so quadratics
of one dimension and batch size vmap together.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import Tensor, nn

from metaopt.tasks.base import Task, TaskFamily, check_split, log_uniform
from metaopt.tasks.data import resolve_dtype, as_range, jsonable, uniform
from metaopt.types import Batch, Params


class QuadraticLoss(nn.Module):
    def __init__(self, A: Tensor, w_star: Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros_like(w_star))
        self.register_buffer("A", A)
        self.register_buffer("w_star", w_star)

    def forward(self, c: Tensor) -> Tensor:
        d = self.w - c                                    # [B, dim]
        return 0.5 * ((d @ self.A) * d).sum(-1).mean()


def random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """Haar-random orthogonal matrix (float64): QR of a Gaussian matrix with the sign fix."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def conditioned_matrix(dim: int, cond: float, generator: torch.Generator) -> Tensor:
    """Symmetric positive definite ``Q diag(eigs) Q^T``, eigs log-spaced in [1/cond, 1]."""
    eigs = torch.logspace(0.0, -math.log10(cond), dim, dtype=torch.float64)
    q = random_rotation(dim, generator)
    a = (q * eigs) @ q.T
    return 0.5 * (a + a.T)


class QuadraticTask(Task):
    """One quadratic. Pass your own ``A`` (symmetric PSD, ``[dim, dim]``) and ``w_star``."""

    def __init__(self, A: Tensor, w_star: Tensor, noise: float = 0.0, batch_size: int = 1,
                 init_scale: float = 1.0, name: str = "quadratic", dtype=None):
        dtype = resolve_dtype(dtype) if dtype is not None else w_star.dtype
        if A.shape != (w_star.numel(), w_star.numel()) or w_star.dim() != 1:
            raise ValueError(f"Invalid shapes: A {tuple(A.shape)}, w_star {tuple(w_star.shape)}")
        if noise < 0:
            raise ValueError(f"Invalid noise: {noise}")
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        module = QuadraticLoss(A.to(dtype), w_star.to(dtype))
        self.dim = w_star.numel()
        self.noise = float(noise)
        super().__init__(name, module, data=None, batch_size=batch_size, init_scale=init_scale,
                         structure=("quadratic", self.dim))

    @property
    def w_star(self) -> Tensor:
        return self.buffers["w_star"]

    @property
    def A(self) -> Tensor:
        return self.buffers["A"]

    def init_params(self, generator: torch.Generator) -> Params:
        """``w0 ~ N(0, init_scale^2 I)``: the start is ~|w_star| away from the optimum."""
        w = torch.randn(self.dim, generator=generator, dtype=self.w_star.dtype)
        return {"w": w * self.init_scale}

    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        shape = (self.batch_size, self.dim)
        if check_split(split) == "train":
            z = torch.randn(shape, generator=generator, dtype=self.w_star.dtype)
            return (self.w_star + self.noise * z,)
        return (self.w_star.expand(shape).clone(),)

    def full_batch(self, split: str) -> Batch:
        """Every split evaluates the noise-free loss (train's expected loss minus the constant
        ``0.5 * noise^2 * trace(A)``)."""
        check_split(split)
        return (self.w_star[None].clone(),)

    def optimal_loss(self) -> float:
        return 0.0

    def __repr__(self) -> str:
        return (f"QuadraticTask(dim={self.dim}, noise={self.noise:.3g}, "
                f"batch_size={self.batch_size})")


class QuadraticFamily(TaskFamily):
    """Random quadratics: per task a condition number (log-uniform in ``cond``), a noise level
    (uniform in ``noise``), a rotation and an optimum ``w_star ~ N(0, I)``. A single number
    fixes an option."""

    name = "quadratic"

    def __init__(self, dim: int = 10, cond=(1.0, 100.0), noise=(0.0, 0.5), batch_size: int = 1,
                 init_scale=1.0, dtype=torch.float32):
        if int(dim) < 1:
            raise ValueError(f"Invalid dim: {dim}")
        if int(batch_size) < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        self.dim = int(dim)
        self.cond = as_range(cond, "cond")
        if self.cond[0] < 1:
            raise ValueError(f"Invalid cond: {cond!r} (condition numbers are >= 1)")
        self.noise = as_range(noise, "noise", positive=False)
        self.batch_size = int(batch_size)
        self.init_scale = as_range(init_scale, "init_scale")
        self.dtype = resolve_dtype(dtype)

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        cond = log_uniform(generator, *self.cond)
        noise = uniform(generator, *self.noise)
        init_scale = log_uniform(generator, *self.init_scale)
        A = conditioned_matrix(self.dim, cond, generator)
        w_star = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        task = QuadraticTask(A, w_star, noise=noise, batch_size=self.batch_size,
                             init_scale=init_scale, name=self.name, dtype=self.dtype)
        task.cond = cond
        return task

    def config(self) -> Dict[str, Any]:
        return {"dim": self.dim, "cond": jsonable(self.cond), "noise": jsonable(self.noise),
                "batch_size": self.batch_size, "init_scale": jsonable(self.init_scale),
                "dtype": jsonable(self.dtype)}
