"""metaopt: meta-learned optimizers and learned update rules for PyTorch.

Public API (re-exports only): tasks, rules, schemes/trainer, the torch.optim drop-ins.
"""
from metaopt.meta import MetaTrainer, TrainConfig, load_rule, make_scheme, save_rule
from metaopt.optim import (SGDHD, SLRLA, AdamHD, Autostep, IDBD, LearnedOptimizer, Lookahead,
                           Lookbehind)
from metaopt.rules import Rule, make_rule
from metaopt.tasks import ArrayDataset, Task, TaskFamily, make_family

__version__ = "0.1.0"

__all__ = ["MetaTrainer", "TrainConfig", "load_rule", "make_scheme", "save_rule", "SGDHD", "SLRLA",
           "AdamHD", "Autostep", "IDBD", "LearnedOptimizer", "Lookahead", "Lookbehind", "Rule",
           "make_rule", "ArrayDataset", "Task", "TaskFamily", "make_family"]
