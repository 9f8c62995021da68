"""torch.optim drop-ins: the learned-rule optimizer and hand-designed baselines."""
from metaopt.optim.learned import LearnedOptimizer
