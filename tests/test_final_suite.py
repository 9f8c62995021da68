"""The final half of the held-out suite (metaopt/tasks/final.py): distinct from the design half,
deterministic, trainable. Only Adam runs here: the final half is never used to judge or tune
a learned rule outside the final report."""
import ast
import math

import pytest
import torch

from metaopt.meta.speedup import train_curve
from metaopt.tasks import FINAL, HELDOUT, SUITE_SETS, make_family, suite_problems, suite_set_of
from metaopt.tasks.data import TEXT_MODULES
from metaopt.tasks.final import CODE_MODULES, load_code, marker_counting

# float64 only where a few dozen steps are cheap
EXPENSIVE = {"digits_mlp_1m", "code_transformer_lm", "digits_resnet_bn", "marker_encoder",
             "adding_lstm"}


def test_halves_are_disjoint_and_large_enough():
    assert len(FINAL) >= 12
    assert not set(FINAL) & set(HELDOUT)
    assert SUITE_SETS == {"design": HELDOUT, "final": FINAL}
    assert suite_problems("final") is FINAL and suite_set_of("adding_lstm") == "final"
    assert suite_set_of("wine_mlp") == "design"
    with pytest.raises(ValueError, match="Invalid suite set"):
        suite_problems("test")
    with pytest.raises(ValueError, match="Invalid problem"):
        make_family("suite", problem="nope")


def _adam(named):
    return torch.optim.Adam([p for _, p in named], lr=3e-3)


@pytest.mark.parametrize("problem", sorted(FINAL))
def test_final_problem_is_deterministic_and_trains(problem):
    a = make_family("suite", problem=problem).sample_seeded(0)
    b = FINAL[problem](torch.float32)
    assert a.name == problem and a.signature == b.signature
    pa = a.init_params(torch.Generator().manual_seed(3))
    pb = b.init_params(torch.Generator().manual_seed(3))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ba = a.sample_batch("train", torch.Generator().manual_seed(4))
    bb = b.sample_batch("train", torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    with torch.no_grad():
        assert float(a.loss(pa, ba)) == float(b.loss(pb, bb))
    for split in ("valid", "test"):
        assert a.data.size(split) > 0
    c = train_curve(a, _adam, steps=30, seed=0, eval_every=10, eval_examples=128)
    assert not c.diverged and all(math.isfinite(v) for v in c.losses)
    assert c.losses[-1] < c.losses[0]


@pytest.mark.parametrize("problem", sorted(set(FINAL) - EXPENSIVE))
def test_final_problem_trains_in_float64(problem):
    task = make_family("suite", problem=problem, dtype=torch.float64).sample_seeded(0)
    params = task.init_params(torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float64 for v in params.values())
    c = train_curve(task, _adam, steps=20, seed=0, eval_every=10, eval_examples=128)
    assert not c.diverged and c.losses[-1] < c.losses[0]


def test_code_text_is_code_from_other_modules_than_the_docstring_text():
    assert not set(CODE_MODULES) & set(TEXT_MODULES)
    code = load_code()
    assert len(code) > 100_000 and "def " in code and "return" in code
    tree = ast.parse(code)                            # still Python, without docstrings
    assert not any(ast.get_docstring(n) for n in ast.walk(tree) if isinstance(
        n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    assert all(" " <= ch <= "~" or ch == "\n" for ch in code[:5000])


def test_marker_counting_labels_count_colours_after_the_marker():
    ds = marker_counting(n=64, length=16, seed=1)
    for split in ("train", "valid", "test"):
        x, y = ds.full(split)
        for row, label in zip(x, y):
            after = row[int((row == 8).nonzero()[0]) + 1:]
            counts = [int((after == c).sum()) for c in range(4)]
            assert int(label) == counts.index(max(counts))
