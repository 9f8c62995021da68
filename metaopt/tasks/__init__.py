"""Tasks: what is optimized. ``make_family(name, **options)`` builds a registered family;
``family.sample_seeded(seed)`` gives a reproducible :class:`Task`."""
from __future__ import annotations

import difflib
import inspect
from typing import Dict, Type

from metaopt.activations import ActivationRecorder
from metaopt.tasks.base import SPLITS, ArrayDataset, FixedFamily, SequenceDataset, Task, TaskFamily
from metaopt.tasks.charlm import CharLMFamily, CharLMModule, CharLMTask
from metaopt.tasks.conv import ConvModule, ConvTask, DigitsConvFamily
from metaopt.tasks.data import (CharVocab, load_sklearn, load_text, make_dataset,
                                standardize_)
from metaopt.tasks.logistic import LogisticFamily, LogisticTask
from metaopt.tasks.mlp import DigitsMLPFamily, MLPModule, MLPTask, SupervisedTask
from metaopt.tasks.quadratic import QuadraticFamily, QuadraticTask
from metaopt.tasks.autoencoder import AutoencoderTask, DigitsAEFamily
from metaopt.tasks.rnn import GRULMTask
from metaopt.tasks.mixture import MixtureFamily, ReparamTask
from metaopt.tasks.final import FINAL
from metaopt.tasks.suite import (DESIGN, HELDOUT, SUITE_SETS, SuiteFamily, suite_problems,
                                   suite_set_of)
from metaopt.tasks.retrieval import AssocRetrievalFamily, RetrievalTask
from metaopt.tasks.synthetic import (MatFacFamily, MatFacTask, RawFeaturesFamily, RegressionFamily,
                                     ResMLPFamily, ResMLPTask, VAEFamily, VAETask)

FAMILIES: Dict[str, Type[TaskFamily]] = {
    "quadratic": QuadraticFamily,
    "logreg_cancer": LogisticFamily,
    "digits_mlp": DigitsMLPFamily,
    "digits_conv": DigitsConvFamily,
    "char_lm": CharLMFamily,
    "digits_ae": DigitsAEFamily,
    "mixture": MixtureFamily,
    "suite": SuiteFamily,
    "assoc_retrieval": AssocRetrievalFamily,
    "regression": RegressionFamily,
    "raw_features": RawFeaturesFamily,
    "vae": VAEFamily,
    "matfac": MatFacFamily,
    "resmlp": ResMLPFamily,
}


def family_options(name: str):
    """The option names ``make_family(name, ...)`` accepts."""
    _check_family_name(name)
    params = inspect.signature(FAMILIES[name].__init__).parameters
    return tuple(p for p in params if p != "self")


def _check_family_name(name: str) -> str:
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family: {name!r} (known: {', '.join(FAMILIES)})")
    return name


def make_family(name: str, **kwargs) -> TaskFamily:
    """Build a registered task family; unknown names and options raise ``ValueError``."""
    known = family_options(name)
    bad = [k for k in kwargs if k not in known]
    if bad:
        hint = ""
        close = difflib.get_close_matches(bad[0], known, n=1)
        if len(bad) == 1 and close:
            hint = f" (did you mean {close[0]!r}?)"
        raise ValueError(f"Unknown option{'s' if len(bad) > 1 else ''} for task family {name!r}: "
                         f"{', '.join(repr(b) for b in bad)}{hint}")
    return FAMILIES[name](**kwargs)


__all__ = [
    "SPLITS", "ActivationRecorder", "ArrayDataset", "SequenceDataset", "Task", "TaskFamily",
    "FixedFamily", "CharVocab", "load_sklearn", "load_text", "make_dataset", "standardize_",
    "QuadraticTask", "QuadraticFamily", "LogisticTask", "LogisticFamily", "SupervisedTask",
    "MLPModule", "MLPTask", "DigitsMLPFamily", "ConvModule", "ConvTask", "DigitsConvFamily",
    "CharLMModule", "CharLMTask", "CharLMFamily", "FAMILIES", "family_options", "make_family",
    "AutoencoderTask", "DigitsAEFamily", "GRULMTask", "MixtureFamily", "ReparamTask", "HELDOUT",
    "SuiteFamily", "RegressionFamily", "RawFeaturesFamily", "VAEFamily", "VAETask", "MatFacFamily",
    "MatFacTask", "ResMLPFamily", "ResMLPTask", "DESIGN", "FINAL", "SUITE_SETS", "suite_problems",
    "suite_set_of",
]
