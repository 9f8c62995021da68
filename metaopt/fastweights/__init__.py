"""Fast-weight layers: weights programmed within a sequence by an update rule, fixed (sum,
delta, Hebbian, TTT gradient descent) or learned (a small write network).

``FastWeightRNN`` (Ba et al. 2016) and ``FastWeightProgrammer`` (Schlag et al. 2021) live in
:mod:`~metaopt.fastweights.layers`; the write rules, recurrent and chunkwise, in
:mod:`~metaopt.fastweights.rules`; the task models and training loops in ``models`` and
``experiments`` (entry point ``metaopt-fastweights``).

Plastic transformers (:mod:`~metaopt.fastweights.plastic`): decoder blocks with a fast-weight
branch programmed by a neuromodulated Hebbian rule or by gradient-based plasticity, and the
copy / in-context regression / few-shot digits tasks of :mod:`~metaopt.fastweights.plastic_tasks`
(``metaopt-fastweights plastic``)."""
from metaopt.fastweights.layers import FastWeightProgrammer, FastWeightRNN
from metaopt.fastweights.models import CapacityModel, RetrievalModel
from metaopt.fastweights.plastic import (PLASTIC_RULES, PlasticBlock, PlasticBranch,
                                         PlasticTransformer, gradient_recurrent,
                                         modulation_by_kind)
from metaopt.fastweights.plastic_tasks import (PLASTIC_TASKS, CopyTask, FewShotDigitsTask,
                                               RegressionTask, make_plastic_task)
from metaopt.fastweights.rules import (CHUNKWISE_RULES, FEATURE_MAPS, WRITE_RULES, WriteNet,
                                       delta_chunkwise, delta_recurrent, feature_map,
                                       hebbian_parallel, hebbian_recurrent, learned_recurrent,
                                       sum_chunkwise, sum_recurrent, ttt_recurrent)

__all__ = ["FastWeightRNN", "FastWeightProgrammer", "CapacityModel", "RetrievalModel",
           "WRITE_RULES", "CHUNKWISE_RULES", "FEATURE_MAPS", "WriteNet", "feature_map",
           "sum_recurrent", "sum_chunkwise", "delta_recurrent", "delta_chunkwise",
           "hebbian_recurrent", "hebbian_parallel", "ttt_recurrent", "learned_recurrent",
           "PLASTIC_RULES", "PlasticBranch", "PlasticBlock", "PlasticTransformer",
           "gradient_recurrent", "modulation_by_kind", "PLASTIC_TASKS", "CopyTask", "RegressionTask",
           "FewShotDigitsTask", "make_plastic_task"]
