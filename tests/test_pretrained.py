"""The shipped "default" rule loads, and really trains models it never saw; the README example runs."""
import re
from pathlib import Path

import torch

from metaopt.optim import LearnedOptimizer
from metaopt.optim.learned import PRETRAINED_DIR
from metaopt.tasks import make_family

README = Path(__file__).parents[1] / "README.md"


def _train(task, opt, params, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = task.sample_batch("train", g)

        def closure():
            opt.zero_grad()
            loss = task.loss(params, batch)
            loss.backward()
            return loss
        opt.step(closure)


def test_default_rule_is_small_and_lowers_heldout_losses():
    files = list((PRETRAINED_DIR / "default").iterdir())
    assert sum(f.stat().st_size for f in files) < 64_000
    for fam, kw, seed, bound in [("digits_mlp", dict(widths=[48], depths=[2]), 123_456, 0.5),
                                 ("digits_conv", {}, 654_321, 0.8),
                                 ("logreg_cancer", {}, 7, 0.3)]:
        task = make_family(fam, **kw).sample_seeded(seed)
        params = {k: v.requires_grad_(True) for k, v in task.init_params(torch.Generator().manual_seed(seed)).items()}
        before = task.evaluate(params)
        opt = LearnedOptimizer.from_pretrained(list(params.items()), "default", model=task.module)
        _train(task, opt, params, 150)
        after = task.evaluate(params)
        assert after < bound < before, (fam, before, after)


def test_readme_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    ns = {}
    exec(compile(code, "README example", "exec"), ns)
    assert float(ns["loss"].detach()) < 1.0  # 200 full-batch steps on a 3-class toy problem
