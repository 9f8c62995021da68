"""The shipped "default" rule loads, and really trains models it never saw; the README example runs."""
import re
from pathlib import Path

import torch

from metaopt.meta.evaluate import train_task
from metaopt.optim import LearnedOptimizer
from metaopt.optim.learned import PRETRAINED_DIR
from metaopt.tasks import make_family

README = Path(__file__).parents[1] / "README.md"


def test_default_rule_is_small_and_lowers_heldout_losses():
    files = list((PRETRAINED_DIR / "default").iterdir())
    assert sum(f.stat().st_size for f in files) < 64_000
    for fam, kw, seed, bound in [("digits_mlp", dict(widths=[48], depths=[2]), 123_456, 0.5),
                                 ("digits_conv", {}, 654_321, 0.8),
                                 ("logreg_cancer", {}, 7, 0.3)]:
        task = make_family(fam, **kw).sample_seeded(seed)
        run = train_task(task, lambda named, t: LearnedOptimizer.from_pretrained(
            named, "default", model=t.module), steps=150, seed=seed, eval_every=150)
        before, after = run.valid_losses[0], run.final_valid
        assert after < bound < before, (fam, before, after)


def test_readme_example_runs():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    ns = {}
    exec(compile(code, "README example", "exec"), ns)
    assert float(ns["loss"].detach()) < 1.0  # 200 full-batch steps on a 3-class toy problem
