"""No silent failures in the command-line apps: each mistake below ends the run with one line,
``error: ...``, that names the key (and exit status 2), instead of a wrong result, an empty log
or a traceback."""
import subprocess
import sys

import pytest
import torch

from metaopt.rules import make_rule
from metaopt.rules.io import save_rule
from metaopt.tasks import make_family
from metaopt.types import FlatSpec

TINY_TRAIN = ["task=digits_mlp", "task.widths=[8]", "task.depths=[1]", "meta.outer_steps=1",
              "meta.meta_batch=2", "meta.horizon=10", "scheme.truncation=5", "meta.progress=false"]
TINY_EVAL = ["eval.steps=10", "eval.eval_every=10", "eval.sgd_lrs=[0.1]", "eval.adam_lrs=[0.01]"]


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("error:"), r.stderr[-2000:]
    for w in words:
        assert w in last, last
    return last


@pytest.fixture(scope="module")
def spec_rule_ckpt(tmp_path_factory):
    """A layerwise_lr checkpoint (one theta entry per tensor) trained for a 64-16-10 MLP."""
    task = make_family("digits_mlp", widths=[16], depths=[1]).sample_seeded(0)
    spec = FlatSpec.from_shapes(task.param_shapes())
    rule = make_rule("layerwise_lr")
    theta = rule.init_theta(spec, torch.Generator().manual_seed(0))
    return save_rule(tmp_path_factory.mktemp("ckpt") / "layerwise", rule, theta, spec)


def test_eval_rule_for_other_shapes_is_an_error(tmp_path, spec_rule_ckpt):
    r = _cli(["metaopt.cli.evaluate", f"checkpoint={spec_rule_ckpt}", "task=digits_conv",
              "eval.num_tasks=1", *TINY_EVAL, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    _one_line_error(r, "checkpoint=", "layerwise_lr", "digits_conv", "task=")
    # its own task, but the default extra family (digits_conv) does not fit: named as such
    r = _cli(["metaopt.cli.evaluate", f"checkpoint={spec_rule_ckpt}", "task.widths=[16]",
              "task.depths=[1]", "eval.num_tasks=1", *TINY_EVAL, f"hydra.run.dir={tmp_path / 'b'}"],
             tmp_path)
    _one_line_error(r, "eval.extra_families", "digits_conv")


def test_eval_duplicate_family_is_evaluated_once(tmp_path):
    r = _cli(["metaopt.cli.evaluate", "checkpoint=default", "task=digits_conv", "eval.num_tasks=1",
              "eval.baselines=[]", *TINY_EVAL, f"hydra.run.dir={tmp_path / 'e'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    learned = [l for l in r.stdout.splitlines() if l.startswith("| digits_conv | learned |")]
    assert len(learned) == 1 and "| 1/1 |" in learned[0], r.stdout
    rows = (tmp_path / "e" / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 2, rows     # one task x (learned, adam@ref), not twice


def test_unknown_key_is_an_error_naming_it(tmp_path):
    r = _cli(["metaopt.cli.train", "+meta.outer_stepz=3", f"hydra.run.dir={tmp_path / 't'}"],
             tmp_path)
    _one_line_error(r, "meta.outer_stepz")
    r = _cli(["metaopt.cli.train", "+foo=1", f"hydra.run.dir={tmp_path / 't'}"], tmp_path)
    _one_line_error(r, "foo")
    r = _cli(["metaopt.cli.evaluate", "+eval.num_taskz=1", f"hydra.run.dir={tmp_path / 'e'}"],
             tmp_path)
    _one_line_error(r, "eval.num_taskz")


def test_resume_with_changed_config_is_an_error(tmp_path):
    run = tmp_path / "run"
    r = _cli(["metaopt.cli.train", *TINY_TRAIN, "rule=pertensor", f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(["metaopt.cli.train", *TINY_TRAIN, "rule=pertensor", "meta.horizon=20", "resume=true",
              f"hydra.run.dir={run}"], tmp_path)
    _one_line_error(r, "resume", "meta.horizon", "20", "10")
    r = _cli(["metaopt.cli.train", *TINY_TRAIN, "rule=mlp", "resume=true", f"hydra.run.dir={run}"],
             tmp_path)
    _one_line_error(r, "resume", "the rule changed", "rule.name", "mlp", "pertensor")
    # running longer is what resume is for
    r = _cli(["metaopt.cli.train", *TINY_TRAIN, "rule=pertensor", "meta.outer_steps=2",
              "resume=true", f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr + r.stdout or (run / "train.log").read_text().count("resumed")


def test_tensorboard_is_installed():
    """TensorBoard logging is part of every meta-training run (a core dependency)."""
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
