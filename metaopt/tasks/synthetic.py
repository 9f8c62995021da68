"""Procedurally generated problems for a broad meta-training distribution.

Each family draws a new problem per task seed (its data function *and* its architecture), so a
rule meta-trained on them meets many loss landscapes rather than a few data sets:

* ``regression`` -- MLP regression (MSE) on a random smooth target (a sum of random sinusoids
  of random projections of Gaussian inputs, 1-8 input dims), optionally with label noise.
  Smooth low-dimensional targets need small, annealed steps at the end.
* ``raw_features`` -- linear or MLP models (softmax cross entropy or MSE) on *unnormalized*
  inputs: every input column is multiplied by its own scale, log-uniform in ``feature_scales``
  (default 1e-3 .. 1e3), the way raw tabular features arrive. Badly scaled inputs make the
  weights of different columns need very different sizes.
* ``vae`` -- a variational autoencoder (Gaussian encoder, MSE decoder, KL term) on a random
  Gaussian-mixture data set: a *stochastic* objective (the reparameterization noise is part of
  each batch, so the loss stays a pure, vmappable function of the batch).
* ``matfac`` -- matrix factorization of a random low-rank rating matrix with user and item
  embeddings: each minibatch touches a few rows of each embedding (sparse row gradients).
* ``resmlp`` -- pre-LayerNorm residual MLPs (``x + W2 act(W1 LN(x))`` blocks) on the 8x8 digits.

Every option that is a list is a set of choices; a two-number ``*_range``/``init_scale`` is a
log-uniform range. Tasks of one drawn architecture vmap together (their data differ, their
shapes do not).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.tasks.base import ArrayDataset, Task, TaskFamily, choice, log_uniform
from metaopt.tasks.data import resolve_dtype, as_choices, as_range, jsonable, make_dataset
from metaopt.tasks.mlp import ACTIVATIONS, MLPTask, check_activation
from metaopt.types import Batch


def _family_config(fam, keys) -> Dict[str, Any]:
    return {k: jsonable(getattr(fam, k)) for k in keys}


def _check_positive(name: str, values) -> None:
    if min(values) < 1:
        raise ValueError(f"Invalid {name}: {list(values)!r} (must be >= 1)")


def _mlp_dims(generator, widths, depths):
    return (choice(generator, widths),) * choice(generator, depths)


# -- regression on smooth random targets ----------------------------------------------------------
def smooth_target(x: Tensor, generator: torch.Generator, num_waves: int = 4,
                  frequency: float = 1.5) -> Tensor:
    """``sum_j a_j sin(f_j w_j . x + b_j)`` with random unit directions ``w_j``, normalized to
    zero mean and unit variance over ``x``."""
    d = x.shape[1]
    w = torch.randn(num_waves, d, generator=generator, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    f = frequency * (0.5 + torch.rand(num_waves, generator=generator, dtype=torch.float64))
    b = 2 * math.pi * torch.rand(num_waves, generator=generator, dtype=torch.float64)
    a = torch.randn(num_waves, generator=generator, dtype=torch.float64)
    y = (torch.sin((x.double() @ w.T) * f + b) * a).sum(1)
    return ((y - y.mean()) / (y.std() + 1e-12)).to(x.dtype)


class RegressionFamily(TaskFamily):
    """MLP regression on a random smooth function of ``in_dims`` Gaussian inputs (see module
    docstring); ``noise``: choices of the label-noise std (0 = a smooth, noiseless target)."""

    name = "regression"

    def __init__(self, in_dims=(1, 2, 4, 8), widths=(16, 32, 64), depths=(1, 2, 3),
                 activations=("tanh", "relu", "gelu"), noise=(0.0, 0.0, 0.3),
                 num_examples: int = 512, batch_sizes=(32, 128), init_scale=(0.5, 2.0),
                 dtype=torch.float32):
        self.in_dims, self.widths, self.depths = (as_choices(v, n) for v, n in
                                                  ((in_dims, "in_dims"), (widths, "widths"),
                                                   (depths, "depths")))
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        for n in ("in_dims", "widths", "depths", "batch_sizes"):
            _check_positive(n, getattr(self, n))
        self.activations = tuple(check_activation(a) for a in as_choices(activations, "activations", str))
        self.noise = as_choices(noise, "noise", float)
        if min(self.noise) < 0:
            raise ValueError(f"Invalid noise: {list(noise)!r} (must be >= 0)")
        if int(num_examples) < 10:
            raise ValueError(f"Invalid num_examples: {num_examples}")
        self.num_examples = int(num_examples)
        self.init_scale = as_range(init_scale, "init_scale")
        self.dtype = resolve_dtype(dtype)

    def sample(self, generator: torch.Generator) -> Task:
        d = choice(generator, self.in_dims)
        hidden = _mlp_dims(generator, self.widths, self.depths)
        act = choice(generator, self.activations)
        noise = choice(generator, self.noise)
        bs = choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        x = torch.randn(self.num_examples, d, generator=generator, dtype=self.dtype)
        y = smooth_target(x, generator)
        y = y + noise * torch.randn(y.shape, generator=generator, dtype=self.dtype)
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator))
        data = ArrayDataset(x, y[:, None], seed=seed, name="smooth")
        return MLPTask(data, hidden=hidden, activation=act, batch_size=bs, init_scale=init_scale,
                       loss="mse", name=self.name, dtype=self.dtype)

    def config(self):
        return _family_config(self, ("in_dims", "widths", "depths", "activations", "noise",
                                     "num_examples", "batch_sizes", "init_scale", "dtype"))


# -- unnormalized inputs ----------------------------------------------------------------------------
class RawFeaturesFamily(TaskFamily):
    """Linear (``hidden`` choice ``0``) or one-hidden-layer models on inputs whose columns are
    scaled by ``feature_scales`` (log-uniform per column); targets are a random teacher of the
    *unscaled* inputs: ``ce`` (``num_classes`` classes) or ``mse``."""

    name = "raw_features"

    def __init__(self, in_dims=(8, 16, 32), hidden=(0, 0, 32), losses=("ce", "mse"),
                 feature_scales=(1e-3, 1e3), num_classes: int = 3, num_examples: int = 512,
                 batch_sizes=(32, 128), init_scale=(0.5, 2.0), dtype=torch.float32):
        self.in_dims = as_choices(in_dims, "in_dims")
        self.hidden = as_choices(hidden, "hidden")
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        _check_positive("in_dims", self.in_dims)
        _check_positive("batch_sizes", self.batch_sizes)
        if min(self.hidden) < 0:
            raise ValueError(f"Invalid hidden: {list(hidden)!r} (0 = linear, else a width)")
        self.losses = as_choices(losses, "losses", str)
        if any(l not in ("ce", "mse") for l in self.losses):
            raise ValueError(f"Invalid losses: {list(losses)!r} (use ce and/or mse)")
        self.feature_scales = as_range(feature_scales, "feature_scales")
        if int(num_classes) < 2:
            raise ValueError(f"Invalid num_classes: {num_classes}")
        self.num_classes, self.num_examples = int(num_classes), int(num_examples)
        self.init_scale = as_range(init_scale, "init_scale")
        self.dtype = resolve_dtype(dtype)

    def sample(self, generator: torch.Generator) -> Task:
        d = choice(generator, self.in_dims)
        h = choice(generator, self.hidden)
        loss = choice(generator, self.losses)
        bs = choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        z = torch.randn(self.num_examples, d, generator=generator, dtype=torch.float64)
        lo, hi = self.feature_scales
        scales = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo))
                           * torch.rand(d, generator=generator, dtype=torch.float64))
        teacher = torch.randn(d, self.num_classes if loss == "ce" else 1, generator=generator,
                              dtype=torch.float64)
        logits = torch.tanh(z) @ teacher * 2.0 if h else z @ teacher / math.sqrt(d) * 3.0
        if loss == "ce":
            y = logits.argmax(1)
        else:
            y = (logits + 0.1 * torch.randn(logits.shape, generator=generator,
                                            dtype=torch.float64)).to(self.dtype)
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator))
        data = ArrayDataset((z * scales).to(self.dtype), y, seed=seed, name="raw")
        return MLPTask(data, hidden=(h,) if h else (), activation="relu", batch_size=bs,
                       init_scale=init_scale, loss=loss,
                       num_outputs=self.num_classes if loss == "ce" else 1, name=self.name,
                       dtype=self.dtype)

    def config(self):
        return _family_config(self, ("in_dims", "hidden", "losses", "feature_scales",
                                     "num_classes", "num_examples", "batch_sizes", "init_scale",
                                     "dtype"))


# -- a stochastic objective: VAE ------------------------------------------------------------------
class NoisyDataset:
    """Wraps an :class:`ArrayDataset` of inputs: a batch is ``(x, eps)`` with fresh standard
    normal noise ``eps`` [B, latent] from the batch generator (the VAE's reparameterization
    noise). ``full(split)`` uses fixed noise (seed 0), so evaluations are deterministic."""

    def __init__(self, data: ArrayDataset, latent: int):
        self.data, self.latent = data, int(latent)
        self.name = data.name

    def size(self, split):
        return self.data.size(split)

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        x, _ = self.data.sample(split, batch_size, generator)
        return x, torch.randn(batch_size, self.latent, generator=generator, dtype=x.dtype)

    def full(self, split: str) -> Batch:
        x, _ = self.data.full(split)
        g = torch.Generator().manual_seed(0)
        return x, torch.randn(len(x), self.latent, generator=g, dtype=x.dtype)


class VAEModule(nn.Module):
    """Encoder MLP -> (mu, log_var) of a diagonal Gaussian; decoder MLP -> reconstruction.
    Loss per example: ``recon_weight * 0.5 * |x - x_hat|^2 + KL(q(z|x) || N(0, I))``, averaged
    over the batch (the negative ELBO up to a constant, for a Gaussian decoder)."""

    def __init__(self, in_dim: int, hidden: int, latent: int, activation: str = "relu",
                 recon_weight: float = 1.0):
        super().__init__()
        self.activation = check_activation(activation)
        self.enc = nn.Linear(in_dim, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Linear(latent, hidden)
        self.dec_out = nn.Linear(hidden, in_dim)
        self.latent, self.recon_weight = int(latent), float(recon_weight)

    def forward(self, x: Tensor, eps: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        x = x.flatten(1)
        mu, log_var = self.enc_out(act(self.enc(x))).split(self.latent, dim=-1)
        log_var = log_var.clamp(-10, 10)
        z = mu + torch.exp(0.5 * log_var) * eps
        x_hat = self.dec_out(act(self.dec(z)))
        recon = 0.5 * (x - x_hat).pow(2).sum(-1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        return (self.recon_weight * recon + kl).mean()


class VAETask(Task):
    """A VAE on any :class:`ArrayDataset` of inputs (targets are ignored)."""

    def __init__(self, data: ArrayDataset, hidden: int = 64, latent: int = 4,
                 activation: str = "relu", batch_size: int = 64, init_scale: float = 1.0,
                 recon_weight: float = 1.0, name: str = "vae", dtype=torch.float32):
        in_dim = int(data.x["train"][0].numel())
        module = VAEModule(in_dim, hidden, latent, activation, recon_weight).to(resolve_dtype(dtype))
        super().__init__(name, module, data=NoisyDataset(data, latent), batch_size=batch_size,
                         init_scale=init_scale,
                         structure=("vae", in_dim, int(hidden), int(latent), activation,
                                    float(recon_weight)))


def gaussian_mixture(n: int, dim: int, components: int, generator: torch.Generator,
                     dtype=torch.float32) -> Tensor:
    """``n`` points from a random mixture of ``components`` anisotropic Gaussians in ``dim``-D
    that lie near a random 3-D subspace (so a small latent space explains most of them)."""
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    centers = 3 * torch.randn(components, 3, generator=generator, dtype=torch.float64)
    k = torch.randint(0, components, (n,), generator=generator)
    low = centers[k] + 0.5 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
    x = low @ basis[:3] + 0.1 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return x.to(dtype)


class VAEFamily(TaskFamily):
    """VAEs on random Gaussian-mixture data (``dims``-D, near a 3-D subspace)."""

    name = "vae"

    def __init__(self, dims=(8, 16), hidden=(32, 64), latents=(2, 4), activations=("relu", "tanh"),
                 num_examples: int = 1024, batch_sizes=(64,), init_scale=(0.5, 2.0),
                 dtype=torch.float32):
        self.dims, self.hidden, self.latents = (as_choices(v, n) for v, n in
                                                ((dims, "dims"), (hidden, "hidden"),
                                                 (latents, "latents")))
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        for n in ("dims", "hidden", "latents", "batch_sizes"):
            _check_positive(n, getattr(self, n))
        self.activations = tuple(check_activation(a) for a in as_choices(activations, "activations", str))
        self.num_examples = int(num_examples)
        self.init_scale = as_range(init_scale, "init_scale")
        self.dtype = resolve_dtype(dtype)

    def sample(self, generator: torch.Generator) -> Task:
        d, h, z = (choice(generator, v) for v in (self.dims, self.hidden, self.latents))
        act = choice(generator, self.activations)
        bs = choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        x = gaussian_mixture(self.num_examples, d, 4, generator, self.dtype)
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator))
        data = ArrayDataset(x, torch.zeros(len(x)), seed=seed, name="gmm")
        return VAETask(data, hidden=h, latent=z, activation=act, batch_size=bs,
                       init_scale=init_scale, name=self.name, dtype=self.dtype)

    def config(self):
        return _family_config(self, ("dims", "hidden", "latents", "activations", "num_examples",
                                     "batch_sizes", "init_scale", "dtype"))


# -- embeddings with sparse rows: matrix factorization -------------------------------------------------
class MatFacModule(nn.Module):
    """Predicted rating ``<u_i, v_j> + b_i + c_j + mu``; loss ``0.5 * MSE``, plus
    ``0.5 * l2 * (|u_i|^2 + |v_j|^2)`` on the embedding rows of the batch."""

    def __init__(self, num_users: int, num_items: int, dim: int, l2: float = 0.0):
        super().__init__()
        self.users = nn.Parameter(torch.zeros(num_users, dim))
        self.items = nn.Parameter(torch.zeros(num_items, dim))
        self.user_bias = nn.Parameter(torch.zeros(num_users))
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.mean = nn.Parameter(torch.zeros(1))
        self.l2 = float(l2)

    def forward(self, ij: Tensor, r: Tensor) -> Tensor:
        u, v = self.users[ij[..., 0]], self.items[ij[..., 1]]
        pred = (u * v).sum(-1) + self.user_bias[ij[..., 0]] + self.item_bias[ij[..., 1]] + self.mean
        loss = 0.5 * (pred - r).pow(2).mean()
        if self.l2:
            loss = loss + 0.5 * self.l2 * (u.pow(2).sum(-1) + v.pow(2).sum(-1)).mean()
        return loss


class MatFacTask(Task):
    """Matrix factorization on a dataset of ``(user, item)`` index pairs (long [N, 2]) and
    float ratings [N]."""

    def __init__(self, data: ArrayDataset, num_users: int, num_items: int, dim: int = 8,
                 l2: float = 0.0, batch_size: int = 128, init_scale: float = 1.0,
                 name: str = "matfac", dtype=torch.float32):
        module = MatFacModule(num_users, num_items, dim, l2).to(resolve_dtype(dtype))
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=("matfac", int(num_users), int(num_items), int(dim), float(l2)))


def low_rank_ratings(num_users: int, num_items: int, rank: int, fraction: float,
                     generator: torch.Generator, noise: float = 0.1, dtype=torch.float32):
    """Observed entries (``fraction`` of all) of a random rank-``rank`` matrix plus user/item
    offsets and noise: ``(pairs [N, 2] long, ratings [N])``."""
    a = torch.randn(num_users, rank, generator=generator, dtype=torch.float64) / math.sqrt(rank)
    b = torch.randn(num_items, rank, generator=generator, dtype=torch.float64)
    full = a @ b.T + 0.5 * torch.randn(num_users, 1, generator=generator, dtype=torch.float64) \
        + 0.5 * torch.randn(1, num_items, generator=generator, dtype=torch.float64) + 3.0
    n = max(10, int(fraction * num_users * num_items))
    flat = torch.randperm(num_users * num_items, generator=generator)[:n]
    pairs = torch.stack([flat // num_items, flat % num_items], 1)
    r = full[pairs[:, 0], pairs[:, 1]] + noise * torch.randn(n, generator=generator, dtype=torch.float64)
    return pairs, r.to(dtype)


class MatFacFamily(TaskFamily):
    """Matrix factorization of random low-rank rating matrices (see :func:`low_rank_ratings`)."""

    name = "matfac"

    def __init__(self, users=(64, 128), items=(64, 96), ranks=(2, 4), dims=(4, 8),
                 fraction: float = 0.2, l2=(0.0, 1e-3), batch_sizes=(64, 256),
                 init_scale=(0.3, 1.0), dtype=torch.float32):
        self.users, self.items, self.ranks, self.dims = (
            as_choices(v, n) for v, n in ((users, "users"), (items, "items"), (ranks, "ranks"),
                                          (dims, "dims")))
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        for n in ("users", "items", "ranks", "dims", "batch_sizes"):
            _check_positive(n, getattr(self, n))
        if not 0 < float(fraction) <= 1:
            raise ValueError(f"Invalid fraction: {fraction} (must be in (0, 1])")
        self.fraction = float(fraction)
        self.l2 = as_choices(l2, "l2", float)
        self.init_scale = as_range(init_scale, "init_scale")
        self.dtype = resolve_dtype(dtype)

    def sample(self, generator: torch.Generator) -> Task:
        nu, ni, r, k = (choice(generator, v) for v in (self.users, self.items, self.ranks, self.dims))
        l2 = choice(generator, self.l2)
        bs = choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        pairs, ratings = low_rank_ratings(nu, ni, r, self.fraction, generator, dtype=self.dtype)
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=generator))
        data = ArrayDataset(pairs, ratings, seed=seed, name="ratings")
        return MatFacTask(data, nu, ni, k, l2, batch_size=bs, init_scale=init_scale,
                          name=self.name, dtype=self.dtype)

    def config(self):
        return _family_config(self, ("users", "items", "ranks", "dims", "fraction", "l2",
                                     "batch_sizes", "init_scale", "dtype"))


# -- pre-LayerNorm residual MLPs ------------------------------------------------------------------------
class ResMLPModule(nn.Module):
    """``Linear(in, d)`` -> ``depth`` blocks ``h + W2 act(W1 LN(h))`` -> ``LN`` -> ``Linear(d, out)``;
    softmax cross entropy."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, activation: str = "gelu",
                 expansion: int = 2):
        super().__init__()
        self.activation = check_activation(activation)
        self.inp = nn.Linear(in_dim, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.up = nn.ModuleList(nn.Linear(width, expansion * width) for _ in range(depth))
        self.down = nn.ModuleList(nn.Linear(expansion * width, width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def outputs(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        h = self.inp(x.flatten(1))
        for norm, up, down in zip(self.norms, self.up, self.down):
            h = h + down(act(up(norm(h))))
        return self.out(self.out_norm(h))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.outputs(x), y)


class ResMLPTask(Task):
    """A pre-LN residual MLP classifier (:class:`ResMLPModule`) on any :class:`ArrayDataset`
    with class labels."""
    def __init__(self, data: ArrayDataset, width: int = 32, depth: int = 2, num_classes: int = 10,
                 activation: str = "gelu", batch_size: int = 64, init_scale: float = 1.0,
                 name: str = "resmlp", dtype=torch.float32):
        in_dim = int(data.x["train"][0].numel())
        module = ResMLPModule(in_dim, width, depth, num_classes, activation).to(resolve_dtype(dtype))
        super().__init__(name, module, data=data, batch_size=batch_size, init_scale=init_scale,
                         structure=("resmlp", in_dim, int(width), int(depth), int(num_classes),
                                    activation))


class ResMLPFamily(TaskFamily):
    """Pre-LN residual MLPs on the 8x8 digits (width, depth, activation, batch size drawn)."""

    name = "resmlp"

    def __init__(self, widths=(16, 32, 64), depths=(2, 4), activations=("gelu", "relu", "silu"),
                 batch_sizes=(32, 128), init_scale=(0.5, 2.0), split_seed: int = 0,
                 dtype=torch.float32):
        self.widths, self.depths = as_choices(widths, "widths"), as_choices(depths, "depths")
        self.batch_sizes = as_choices(batch_sizes, "batch_sizes")
        for n in ("widths", "depths", "batch_sizes"):
            _check_positive(n, getattr(self, n))
        self.activations = tuple(check_activation(a) for a in as_choices(activations, "activations", str))
        self.init_scale = as_range(init_scale, "init_scale")
        self.split_seed = int(split_seed)
        self.dtype = resolve_dtype(dtype)

    def sample(self, generator: torch.Generator) -> Task:
        w, d = choice(generator, self.widths), choice(generator, self.depths)
        act, bs = choice(generator, self.activations), choice(generator, self.batch_sizes)
        init_scale = log_uniform(generator, *self.init_scale)
        data = make_dataset("digits", self.split_seed, dtype=self.dtype, flat=True)
        return ResMLPTask(data, w, d, 10, act, bs, init_scale, name=self.name, dtype=self.dtype)

    def config(self):
        return _family_config(self, ("widths", "depths", "activations", "batch_sizes",
                                     "init_scale", "split_seed", "dtype"))
