"""How theta learns: differentiable unrolls, discretization schemes, the meta-training loop."""
from metaopt.meta.schemes import SCHEMES, Scheme, SchemeOutput, make_scheme, register_scheme
from metaopt.meta.nested import Nested
from metaopt.meta.interleaved import Interleaved
from metaopt.meta.continuous import Continuous
from metaopt.meta.es import ES, PES
from metaopt.meta.unroll import META_LOSSES, MetaLoss, UnrollOut, inner_step, unroll
from metaopt.meta.engine import SlotGroup, run_slots
from metaopt.meta.trainer import MetaTrainer, TrainConfig
from metaopt.rules.io import CheckpointError, load_rule, save_rule

__all__ = ["SCHEMES", "Scheme", "SchemeOutput", "make_scheme", "register_scheme", "Nested",
           "Interleaved", "Continuous", "ES", "PES", "META_LOSSES", "MetaLoss", "UnrollOut",
           "SlotGroup", "run_slots", "inner_step", "unroll", "MetaTrainer", "TrainConfig",
           "CheckpointError", "load_rule", "save_rule"]
