"""The *final* half of the held-out suite: run only for the final report, never for decisions.

The held-out suite has two halves. The *design* half (:data:`metaopt.tasks.suite.HELDOUT`) is
what design decisions (rules, features, training recipes, checkpoints) are judged on; after
enough rounds of that, a learned optimizer is partly fitted to it. The *final* half
(:data:`FINAL`, this file) is evaluated once, for the reported numbers, and nothing is tuned on
its results. Every problem here differs from every design problem *and* from every meta-training
family (see :mod:`metaopt.tasks.synthetic`, :mod:`metaopt.tasks.mixture`) in its data,
architecture or loss, most in two of the three (each entry's comment says how):

* meta-training: digits MLPs (width 16-128, depth 1-3, relu/tanh/gelu, +-LayerNorm), digits conv
  nets (8-16 channels, no BatchNorm), digits MSE autoencoders, logistic regression on
  standardized breast cancer, quadratics, a 1-layer char transformer on stdlib docstrings,
  smooth-target MLP regression on Gaussian inputs, linear/1-hidden models on badly scaled
  synthetic columns, VAEs on Gaussian mixtures, matrix factorization, pre-LN residual digits MLPs;
* design half: wine tanh MLP, diabetes MLP (MSE), breast-cancer GELU MLP (BCE), digits linear,
  512-wide, 6-layer SiLU, BatchNorm MLPs, a 32-channel ELU CNN, a BCE digits autoencoder, a
  char-level GRU.

Data come from packages only (scikit-learn's bundled sets and generators, Python's own source
files, seeded synthetic generators): nothing is downloaded. Each builder ``dtype -> Task`` is
deterministic (fixed data seeds; a task seed then draws the init and the minibatches). The
digits problems use split seed 2 (training uses 0, the design half 1).
"""
from __future__ import annotations

import ast
import functools
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metaopt.tasks.base import ArrayDataset, SequenceDataset, Task
from metaopt.tasks.charlm import CharLMTask
from metaopt.tasks.data import (CharVocab, resolve_dtype, stdlib_source, to_ascii,
                                load_sklearn, make_dataset, standardize_)
from metaopt.tasks.mlp import ACTIVATIONS, MLPModule, MLPTask, SupervisedModule, SupervisedTask
from metaopt.tasks.synthetic import VAETask

_SPLIT_SEED = 2   # data splits of the final half (training uses 0, the design half 1)


# -- data ---------------------------------------------------------------------------------------
def _arrays(x, y, dtype, name: str) -> ArrayDataset:
    """An ArrayDataset from numpy arrays: float features in ``dtype``; integer targets as class
    ids, float targets in ``dtype``."""
    import numpy as np
    xt = torch.tensor(np.asarray(x, dtype=np.float64), dtype=dtype)
    y = np.asarray(y)
    yt = (torch.tensor(y, dtype=torch.int64) if y.dtype.kind in "iub"
          else torch.tensor(y, dtype=dtype))
    return ArrayDataset(xt, yt, seed=_SPLIT_SEED, name=name)


def _raw(name: str, dtype) -> ArrayDataset:
    """A bundled tabular set with its raw, unstandardized features."""
    return make_dataset(name, _SPLIT_SEED, dtype=dtype, standardize=False)


def _digits(dtype, flat: bool) -> ArrayDataset:
    return make_dataset("digits", _SPLIT_SEED, dtype=dtype, flat=flat)


def friedman1(dtype) -> ArrayDataset:
    """``make_friedman1``: 10 uniform [0, 1] inputs (5 of them irrelevant), a smooth nonlinear
    target with noise std 1; the target is standardized with train statistics."""
    from sklearn.datasets import make_friedman1
    x, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    return standardize_(_arrays(x, y, dtype, "friedman1"), x=False, y=True)


def moons(dtype) -> ArrayDataset:
    """``make_moons``: two interleaved 2-D half circles with noise 0.2, 2 classes."""
    from sklearn.datasets import make_moons
    x, y = make_moons(n_samples=2000, noise=0.2, random_state=0)
    return _arrays(x, y, dtype, "moons")


def iris(dtype) -> ArrayDataset:
    """``load_iris`` (150 flowers, 4 features, 3 classes), standardized with train statistics."""
    from sklearn.datasets import load_iris
    x, y = load_iris(return_X_y=True)
    return standardize_(_arrays(x, y, dtype, "iris"))


def clusters(dtype) -> ArrayDataset:
    """``make_classification``: 4 classes of 2 Gaussian clusters each in 20-D (8 informative,
    4 redundant, 8 noise features), 5% of the labels flipped."""
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=2000, n_features=20, n_informative=8, n_redundant=4,
                               n_classes=4, n_clusters_per_class=2, flip_y=0.05,
                               random_state=0)
    return _arrays(x, y, dtype, "clusters")


def diabetes_poly(dtype, degree: int = 2) -> ArrayDataset:
    """Degree-2 polynomial features (65 columns, no bias) of the diabetes features as
    scikit-learn ships them (each column already centered and scaled to norm 1, so products are
    ~20x smaller than the linear terms and strongly correlated: the design matrix's condition
    number is ~1.7e4); the target is standardized with train statistics."""
    from sklearn.datasets import load_diabetes
    from sklearn.preprocessing import PolynomialFeatures
    x, y = load_diabetes(return_X_y=True)
    xp = PolynomialFeatures(degree, include_bias=False).fit_transform(x)
    return standardize_(_arrays(xp, y, dtype, "diabetes_poly"), x=False, y=True)


def adding_problem(dtype, n: int = 4000, length: int = 20, seed: int = 0) -> ArrayDataset:
    """The adding problem (Hochreiter & Schmidhuber): a sequence of ``length`` steps with two
    channels, a value uniform in [0, 1] and a marker that is 1 at exactly two random positions
    (one in each half); the target is the sum of the two marked values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g, dtype=torch.float64)
    first = torch.randint(0, length // 2, (n,), generator=g)
    second = torch.randint(length // 2, length, (n,), generator=g)
    marks = torch.zeros(n, length, dtype=torch.float64)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    y = (values * marks).sum(1)
    return ArrayDataset(torch.stack([values, marks], -1).to(dtype), y.to(dtype),
                        seed=_SPLIT_SEED, name="adding")


#: token ids of :func:`marker_counting`
COLOURS, DISTRACTORS, MARKER = 4, 4, 8


def marker_counting(n: int = 4096, length: int = 16, seed: int = 0) -> ArrayDataset:
    """Token sequences over 9 symbols: 4 "colours", 4 distractors and one marker that occurs
    once, at a random position in [2, length - 6]. The label is the colour that occurs most
    often *after* the marker (ties: the smallest id), so a model must relate every token to
    the marker's position."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, COLOURS + DISTRACTORS, (n, length), generator=g)
    pos = torch.randint(2, length - 5, (n,), generator=g)
    x[torch.arange(n), pos] = MARKER
    after = torch.arange(length)[None, :] > pos[:, None]
    counts = torch.stack([((x == c) & after).sum(1) for c in range(COLOURS)], 1)
    y = counts.argmax(1)   # first maximum: ties go to the smallest id
    return ArrayDataset(x, y, seed=_SPLIT_SEED, name="marker_counting")


def topic_documents(n: int = 3000, vocab: int = 512, length: int = 24, topics: int = 6,
                    keywords: int = 24, p_keyword: float = 0.3, seed: int = 0) -> ArrayDataset:
    """Bags of words: each document (``length`` token ids) has one of ``topics`` topics; a
    token is one of its topic's ``keywords`` with probability ``p_keyword`` and otherwise a
    background word from a Zipf distribution over the whole vocabulary (so most embedding rows
    are rarely touched). The label is the topic."""
    g = torch.Generator().manual_seed(seed)
    kw = torch.stack([torch.randperm(vocab, generator=g)[:keywords] for _ in range(topics)])
    y = torch.randint(0, topics, (n,), generator=g)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    background = torch.multinomial(zipf / zipf.sum(), n * length, replacement=True,
                                   generator=g).reshape(n, length)
    pick = torch.randint(0, keywords, (n, length), generator=g)
    use_kw = torch.rand(n, length, generator=g) < p_keyword
    x = torch.where(use_kw, kw[y[:, None], pick], background)
    return ArrayDataset(x, y, seed=_SPLIT_SEED, name="topics")


#: Standard-library modules whose *code* (docstrings removed) makes up :func:`load_code`. None of
#: them is in :data:`metaopt.tasks.data.TEXT_MODULES` (the docstring text of meta-training).
CODE_MODULES = (
    "bisect", "calendar", "colorsys", "csv", "fnmatch", "glob", "graphlib", "gzip", "queue",
    "sched", "shlex", "tokenize", "traceback", "uuid", "pprint", "copy", "base64", "bz2",
    "mimetypes", "netrc", "optparse", "plistlib", "quopri", "reprlib", "selectors",
    "socketserver", "tabnanny", "timeit", "trace", "weakref", "webbrowser", "wave", "zipapp",
)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def load_code() -> str:
    """Python source code that ships with Python: the modules of :data:`CODE_MODULES`, parsed,
    docstrings removed and unparsed (so comments are gone and the layout is normalized),
    reduced to printable ASCII plus newline (~0.4M characters)."""
    parts = []
    for m in CODE_MODULES:
        src = stdlib_source(m)
        if src is not None:
            parts.append(ast.unparse(_strip_docstrings(ast.parse(src))))
    return to_ascii("\n\n".join(parts)) + "\n"


@functools.lru_cache(maxsize=None)
def _code_tokens():
    text = load_code()
    vocab = CharVocab.from_text(text)
    return vocab, vocab.encode(text)


# -- modules --------------------------------------------------------------------------------------
class CriterionMLP(MLPModule):
    """An :class:`MLPModule` classifier with another criterion: ``smooth_ce`` (cross entropy
    with label smoothing ``smoothing``) or ``hinge`` (the multi-class margin loss)."""

    CRITERIA = ("smooth_ce", "hinge")

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str,
                 criterion: str, smoothing: float = 0.1):
        super().__init__(in_dim, hidden, out_dim, activation, loss="ce")
        if criterion not in self.CRITERIA:
            raise ValueError(f"Invalid criterion: {criterion!r} (use one of {self.CRITERIA})")
        self.criterion, self.smoothing = criterion, float(smoothing)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.outputs(x)
        if y is None:
            return out
        if self.criterion == "hinge":
            return F.multi_margin_loss(out, y)
        return F.cross_entropy(out, y, label_smoothing=self.smoothing)


class ResNetBNModule(SupervisedModule):
    """A small conv ResNet: ``conv3x3 -> BN -> relu``, then ``blocks`` residual blocks
    ``relu(h + BN(conv(relu(BN(conv(h))))))`` at ``channels`` channels, global average pooling
    and a linear head. BatchNorm uses batch statistics (training mode, also when a loss is
    evaluated); its running statistics are buffers that nothing reads, as in the design half's
    BatchNorm MLP. Loss: cross entropy with label smoothing ``smoothing``."""

    def __init__(self, in_channels: int, channels: int, blocks: int, out_dim: int,
                 smoothing: float = 0.1):
        super().__init__("ce")
        c = int(channels)
        self.stem = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c)
        self.conv1 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(blocks))
        self.bn1 = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(blocks))
        self.conv2 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(blocks))
        self.bn2 = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(blocks))
        self.head = nn.Linear(c, int(out_dim))
        self.smoothing = float(smoothing)

    def outputs(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem_bn(self.stem(x)))
        for c1, b1, c2, b2 in zip(self.conv1, self.bn1, self.conv2, self.bn2):
            h = F.relu(h + b2(c2(F.relu(b1(c1(h))))))
        return self.head(h.mean((2, 3)))

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.outputs(x)
        if y is None:
            return out
        return F.cross_entropy(out, y, label_smoothing=self.smoothing)


class LSTMRegressor(nn.Module):
    """A one-layer LSTM written with ``nn.Linear`` gates (so it runs under ``functional_call``
    and ``torch.func``), reading ``x`` [B, T, in_dim]; a linear head on the last hidden state
    predicts a scalar target; loss: half mean squared error."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, 4 * hidden)
        self.rec = nn.Linear(hidden, 4 * hidden, bias=False)
        self.head = nn.Linear(hidden, 1)
        self.hidden = int(hidden)

    def outputs(self, x: Tensor) -> Tensor:
        e = self.inp(x)                                       # [B, T, 4H]
        h = c = e.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            i, f, g, o = (e[:, t] + self.rec(h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h).squeeze(-1)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.outputs(x)
        return out if y is None else 0.5 * (out - y).pow(2).mean()


class EncoderBlock(nn.Module):
    """Pre-LN transformer block with *bidirectional* (unmasked) self-attention."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.out = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.n_heads, d // self.n_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.MATH):   # vmappable and twice differentiable (see charlm)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class EncoderClassifier(nn.Module):
    """Token + position embeddings, ``n_layers`` :class:`EncoderBlock`, a final LayerNorm, mean
    pooling over positions and a linear head; softmax cross entropy."""

    def __init__(self, vocab: int, seq_len: int, classes: int, d_model: int = 32,
                 n_layers: int = 2, n_heads: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def outputs(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[-1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h).mean(1))

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.outputs(x)
        return out if y is None else F.cross_entropy(out, y)


class EmbeddingBagClassifier(nn.Module):
    """fastText-style: the mean of the documents' token embeddings, then a linear layer to the
    classes; softmax cross entropy. Each minibatch touches only the rows of its tokens."""

    def __init__(self, vocab: int, dim: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def outputs(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x).mean(1))

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
        out = self.outputs(x)
        return out if y is None else F.cross_entropy(out, y)


def _task(name: str, module: nn.Module, data, batch_size: int, dtype, structure,
          cls=Task) -> Task:
    return cls(name, module.to(resolve_dtype(dtype)), data=data, batch_size=batch_size,
               structure=structure)


# -- builders ---------------------------------------------------------------------------------------
def wine_raw_softmax(dt) -> Task:
    return MLPTask(_raw("wine", dt), hidden=(), batch_size=32, loss="ce",
                   name="wine_raw_softmax", dtype=dt)


def cancer_raw_mlp(dt) -> Task:
    return MLPTask(_raw("breast_cancer", dt), hidden=(32, 32), activation="relu", batch_size=32,
                   loss="ce", name="cancer_raw_mlp", dtype=dt)


def friedman_tanh_mlp(dt) -> Task:
    return MLPTask(friedman1(dt), hidden=(64, 64), activation="tanh", batch_size=64, loss="mse",
                   name="friedman_tanh_mlp", dtype=dt)


def moons_deep_narrow(dt) -> Task:
    return MLPTask(moons(dt), hidden=(16,) * 8, activation="relu", batch_size=64, loss="ce",
                   name="moons_deep_narrow", dtype=dt)


def iris_mlp_smooth(dt) -> Task:
    data = iris(dt)
    module = CriterionMLP(4, (16, 16), 3, "elu", "smooth_ce", smoothing=0.1)
    return _task("iris_mlp_smooth", module, data, 16, dt,
                 ("criterion_mlp", 4, (16, 16), 3, "elu", "smooth_ce", 0.1), SupervisedTask)


def clusters_hinge_mlp(dt) -> Task:
    data = clusters(dt)
    module = CriterionMLP(20, (64,), 4, "relu", "hinge")
    return _task("clusters_hinge_mlp", module, data, 64, dt,
                 ("criterion_mlp", 20, (64,), 4, "relu", "hinge"), SupervisedTask)


def diabetes_poly_linear(dt) -> Task:
    return MLPTask(diabetes_poly(dt), hidden=(), batch_size=32, loss="mse",
                   name="diabetes_poly_linear", dtype=dt)


def digits_resnet_bn(dt) -> Task:
    module = ResNetBNModule(1, 16, 2, 10, smoothing=0.1)
    return _task("digits_resnet_bn", module, _digits(dt, flat=False), 32, dt,
                 ("resnet_bn", 16, 2, 0.1), SupervisedTask)


def digits_mlp_1m(dt) -> Task:
    return MLPTask(_digits(dt, flat=True), hidden=(1024, 1024), activation="relu",
                   batch_size=128, loss="ce", l2=1e-4, name="digits_mlp_1m", dtype=dt)


def digits_vae(dt) -> Task:
    return VAETask(_digits(dt, flat=True), hidden=128, latent=8, activation="relu",
                   batch_size=64, name="digits_vae", dtype=dt)


def adding_lstm(dt) -> Task:
    return _task("adding_lstm", LSTMRegressor(2, 32), adding_problem(dt), 64, dt,
                 ("lstm", 2, 32, 20))


def marker_encoder(dt) -> Task:
    module = EncoderClassifier(COLOURS + DISTRACTORS + 1, 16, COLOURS, d_model=32, n_layers=2,
                               n_heads=2)
    return _task("marker_encoder", module, marker_counting(), 64, dt, ("encoder", 32, 2, 2, 16))


def topics_embedding_bag(dt) -> Task:
    return _task("topics_embedding_bag", EmbeddingBagClassifier(512, 32, 6), topic_documents(),
                 64, dt, ("embedding_bag", 512, 32, 6))


def code_transformer_lm(dt) -> Task:
    vocab, tokens = _code_tokens()
    data = SequenceDataset(tokens, 64, name="code")
    return CharLMTask(data, len(vocab), d_model=64, n_layers=2, n_heads=4, batch_size=16,
                      name="code_transformer_lm", dtype=dt)


FINAL: Dict[str, Callable[[torch.dtype], Task]] = {
    # raw (unstandardized) tabular features; linear model, unlike the design half's wine MLP
    "wine_raw_softmax": wine_raw_softmax,
    # raw breast-cancer features (areas ~1e3 next to ratios ~1e-2); relu MLP, 2-class softmax
    "cancer_raw_mlp": cancer_raw_mlp,
    # Friedman-1 (uniform inputs, 5 irrelevant) regression; 2-layer tanh MLP, MSE
    "friedman_tanh_mlp": friedman_tanh_mlp,
    # 2-D make_moons; a deep narrow (8 x 16) relu MLP
    "moons_deep_narrow": moons_deep_narrow,
    # iris; ELU MLP with label-smoothed cross entropy
    "iris_mlp_smooth": iris_mlp_smooth,
    # make_classification clusters with flipped labels; multi-class hinge loss (non-smooth)
    "clusters_hinge_mlp": clusters_hinge_mlp,
    # diabetes polynomial features (ill-conditioned, condition number ~1.7e4); linear, MSE
    "diabetes_poly_linear": diabetes_poly_linear,
    # digits; conv ResNet with BatchNorm, label-smoothed cross entropy
    "digits_resnet_bn": digits_resnet_bn,
    # digits; a 1.1M-parameter MLP (64-1024-1024-10), cross entropy + 1e-4 weight penalty (it
    # would otherwise memorize the 1,078 training digits within a few hundred steps)
    "digits_mlp_1m": digits_mlp_1m,
    # digits; a VAE (stochastic ELBO), unlike the design half's deterministic BCE autoencoder
    "digits_vae": digits_vae,
    # the adding problem (synthetic sequences); an LSTM regressor, MSE
    "adding_lstm": adding_lstm,
    # synthetic token sequences; a bidirectional transformer encoder classifier
    "marker_encoder": marker_encoder,
    # synthetic bag-of-words documents with Zipf background words; an embedding-bag classifier
    "topics_embedding_bag": topics_embedding_bag,
    # Python source code (not docstrings); a 2-layer, 64-wide causal transformer LM
    "code_transformer_lm": code_transformer_lm,
}
