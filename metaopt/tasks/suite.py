"""The held-out evaluation suite: problems that are never in the meta-training mixture.

It has two halves, both different from every meta-training family in data, architecture or
loss (the training mixture is digits MLPs of width 16-128 and depth 1-3 with/without LayerNorm,
digits conv nets with 8-16 channels, digits MSE autoencoders, logistic regression on breast
cancer, quadratics, a tiny char-level transformer, and the procedural families of
:mod:`metaopt.tasks.synthetic`):

* ``design`` (:data:`HELDOUT`, here; ``DESIGN`` is the same dict): the problems design decisions
  are judged on. Having been looked at many times, its numbers are optimistic for whatever was
  chosen on them.
* ``final`` (:data:`metaopt.tasks.final.FINAL`): evaluated only for the final report and never
  used to choose anything, so its numbers stay an unbiased test. Its problems also differ from
  every design problem.

``make_family("suite", problem=name)`` gives one problem of either half as a family (the names
are disjoint): the architecture is fixed, a seed draws the initialization (and the minibatch
stream). :data:`SUITE_SETS` maps ``"design"``/``"final"`` to the two dicts.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from metaopt.tasks.autoencoder import AutoencoderTask, reconstruction_dataset
from metaopt.tasks.base import SequenceDataset, Task, TaskFamily
from metaopt.tasks.conv import ConvTask
from metaopt.tasks.data import CharVocab, resolve_dtype, load_sklearn, load_text, make_dataset
from metaopt.tasks.final import FINAL
from metaopt.tasks.mlp import MLPTask
from metaopt.tasks.rnn import GRULMTask


def _digits(dtype, flat=False):
    return make_dataset("digits", 1, dtype=dtype, flat=flat)  # split seed 1: not training's split


def _text_data(seq_len: int = 32):
    text = load_text()
    vocab = CharVocab.from_text(text)
    return vocab, SequenceDataset(vocab.encode(text), seq_len, name="text")


HELDOUT: Dict[str, Callable[[torch.dtype], Task]] = {
    # other data sets (tabular), other losses
    "wine_mlp": lambda dt: MLPTask(make_dataset("wine", 0, dtype=dt), hidden=(32,),
                                   activation="tanh", batch_size=32, name="wine_mlp", dtype=dt),
    "diabetes_mlp": lambda dt: MLPTask(make_dataset("diabetes", 0, dtype=dt), hidden=(64, 64),
                                       activation="relu", batch_size=32, loss="mse",
                                       name="diabetes_mlp", dtype=dt),
    "cancer_mlp_bce": lambda dt: MLPTask(make_dataset("breast_cancer", 0, dtype=dt),
                                         hidden=(128, 64), activation="gelu", batch_size=32,
                                         loss="bce", name="cancer_mlp_bce", dtype=dt),
    # other architectures on digits
    "digits_linear": lambda dt: MLPTask(_digits(dt, flat=True), hidden=(), batch_size=64,
                                        name="digits_linear", dtype=dt),
    "digits_wide_mlp": lambda dt: MLPTask(_digits(dt, flat=True), hidden=(512,),
                                          activation="relu", batch_size=128,
                                          name="digits_wide_mlp", dtype=dt),
    "digits_deep_mlp": lambda dt: MLPTask(_digits(dt, flat=True), hidden=(32,) * 6,
                                          activation="silu", batch_size=64,
                                          name="digits_deep_mlp", dtype=dt),
    "digits_bn_mlp": lambda dt: MLPTask(_digits(dt, flat=True), hidden=(128, 128),
                                        activation="relu", batch_size=64, norm="batch",
                                        name="digits_bn_mlp", dtype=dt),
    "digits_cnn_wide": lambda dt: ConvTask(_digits(dt), channels=(32, 32), activation="elu",
                                           batch_size=64, name="digits_cnn_wide", dtype=dt),
    "digits_ae_bce": lambda dt: AutoencoderTask(
        reconstruction_dataset(load_sklearn("digits", dtype=dt, flat=True)[0], 1, "digits"),
        hidden=(128, 32, 128), activation="elu", loss="bce", name="digits_ae_bce", dtype=dt),
    "char_gru": lambda dt: GRULMTask(_text_data()[1], len(_text_data()[0]), embed=32, hidden=64,
                                     batch_size=32, name="char_gru", dtype=dt),
}


DESIGN = HELDOUT

#: the two halves of the held-out suite (see the module docstring)
SUITE_SETS: Dict[str, Dict[str, Callable[[torch.dtype], Task]]] = {"design": HELDOUT,
                                                                  "final": FINAL}


def suite_problems(suite_set: str = "design") -> Dict[str, Callable[[torch.dtype], Task]]:
    """The problems (name -> builder) of one half: ``design`` or ``final``."""
    if suite_set not in SUITE_SETS:
        raise ValueError(f"Invalid suite set: {suite_set!r} (use one of {', '.join(SUITE_SETS)})")
    return SUITE_SETS[suite_set]


def suite_set_of(problem: str) -> str:
    """Which half ``problem`` belongs to (``ValueError`` naming all problems if neither)."""
    for name, problems in SUITE_SETS.items():
        if problem in problems:
            return name
    known = "; ".join(f"{k}: {', '.join(v)}" for k, v in SUITE_SETS.items())
    raise ValueError(f"Invalid problem: {problem!r} (known: {known})")


class SuiteFamily(TaskFamily):
    """One held-out problem (``problem``: a key of ``HELDOUT`` or of ``FINAL``) as a family over
    init seeds."""

    name = "suite"

    def __init__(self, problem: str = "wine_mlp", dtype=torch.float32):
        self.suite_set = suite_set_of(problem)
        self.problem = problem
        self.dtype = resolve_dtype(dtype)
        self._task = None

    def sample(self, generator: torch.Generator) -> Task:
        if self._task is None:   # the architecture and data are fixed; the seed draws the init
            self._task = SUITE_SETS[self.suite_set][self.problem](self.dtype)
        return self._task

    def config(self):
        return {"problem": self.problem}
