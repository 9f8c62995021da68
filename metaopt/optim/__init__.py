"""torch.optim drop-ins: the learned-rule optimizer and hand-designed baselines."""
from metaopt.optim.learned import LearnedOptimizer
from metaopt.optim.lookahead import Lookahead
from metaopt.optim.lookbehind import Lookbehind
from metaopt.optim.slrla import SLRLA
from metaopt.optim.hypergradient import AdamHD, SGDHD
from metaopt.optim.idbd import IDBD, Autostep

__all__ = ["LearnedOptimizer", "Lookahead", "Lookbehind", "SLRLA", "AdamHD", "SGDHD", "IDBD",
           "Autostep"]
