"""Every config group composes; the CLIs run tiny jobs; bad values get one-line errors."""
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from metaopt.cli.common import CONF_DIR
from metaopt.cli.config import build_family, build_rule, build_scheme, build_train_config, register_configs

register_configs()


def _options(group):
    repo = ConfigStore.instance().repo.get(group, {})
    names = {n[:-5] for n in repo}
    d = CONF_DIR / group
    if d.is_dir():
        names |= {p.stem for p in d.glob("*.yaml")}
    return sorted(names)


@pytest.mark.parametrize("group", ["task", "rule", "scheme", "meta"])
def test_every_train_group_option_composes_and_builds(group):
    opts = _options(group)
    assert opts, group
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for opt in opts:
            cfg = compose(config_name="train", overrides=[f"{group}={opt}"])
            if group == "task":
                fam = build_family(cfg.task)
                assert fam.sample_seeded(0) is not None
            elif group == "rule":
                build_rule(cfg.rule)
            elif group == "scheme" and opt == "continuous" and find_spec("torchdiffeq") is None:
                with pytest.raises(ImportError, match=r"metaopt\[ode\]"):  # the optional extra
                    build_scheme(cfg.scheme)
            elif group == "scheme":
                build_scheme(cfg.scheme)
            else:
                build_train_config(cfg.meta)


def test_eval_config_and_optimizer_group_compose():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="eval")
        assert cfg.eval.steps == 500 and cfg.get("optimizer") is None
        for opt in _options("optimizer"):
            cfg = compose(config_name="eval", overrides=[f"optimizer={opt}"])
            assert "lr" in cfg.optimizer, opt


def test_bad_values_raise_errors_naming_the_key():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=["meta.horizon=0"])
        with pytest.raises(ValueError, match="meta.horizon"):
            build_train_config(cfg.meta)
        cfg = compose(config_name="train", overrides=["rule.hidden_size=0"])
        with pytest.raises(ValueError, match="hidden_size"):
            build_rule(cfg.rule)
        cfg = compose(config_name="train", overrides=["meta.meta_loss=final"])
        with pytest.raises(ValueError, match="meta_loss"):
            build_train_config(cfg.meta)
        with pytest.raises(Exception, match="outer_stepz"):
            compose(config_name="train", overrides=["meta.outer_stepz=3"])


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_train_then_eval_cli_tiny(tmp_path):
    run = tmp_path / "train"
    r = _cli(["metaopt.cli.train", "task=digits_mlp", "meta.outer_steps=2", "meta.meta_batch=2",
              "meta.horizon=10",
              "scheme.truncation=5", "rule.hidden_size=4", "meta.progress=false",
              f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run / "checkpoints" / "last"
    assert (ckpt / "theta.safetensors").exists() and (ckpt / "rule.json").exists()
    assert (ckpt / "config.yaml").exists()
    ev = tmp_path / "eval"
    r = _cli(["metaopt.cli.evaluate", f"checkpoint={ckpt}", "eval.steps=20", "eval.num_tasks=1",
              "eval.eval_every=10", "eval.sgd_lrs=[0.1]", "eval.adam_lrs=[0.01]",
              f"hydra.run.dir={ev}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| digits_mlp | learned |" in r.stdout and "| digits_conv | adam(tuned) |" in r.stdout
    assert (ev / "results.csv").exists() and (ev / "curves.png").exists()


def test_cli_bad_value_is_one_line_error(tmp_path):
    r = _cli(["metaopt.cli.train", "meta.outer_lr=-1", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert err[-1].startswith("error:") and "meta.outer_lr" in err[-1], r.stderr
    r = _cli(["metaopt.cli.evaluate", "checkpoint=/nonexistent", f"hydra.run.dir={tmp_path}"], tmp_path)
    assert r.returncode != 0 and "checkpoint=" in r.stderr.splitlines()[-1]


def test_two_job_multirun_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    r = _cli(["metaopt.cli.train", "-m", "scheme=nested,interleaved", "task=quadratic", "rule=sgd",
              "meta.outer_steps=3", "meta.meta_batch=2", "meta.horizon=6", "meta.progress=false",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.csv"))
    assert len(runs) == 2
    r = _cli(["metaopt.cli.report", str(sweep), "--eval-steps", "5", "--eval-tasks", "1"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import csv
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert sorted(r["scheme"] for r in rows) == ["interleaved", "nested"]
    assert all(float(r["heldout_learned"]) > 0 for r in rows)
    # interleaved takes one inner step per outer step, nested one window (20) per outer step
    steps = {r["scheme"]: int(r["inner_steps"]) for r in rows}
    assert steps["nested"] == 3 * 2 * 20 and steps["interleaved"] == 3 * 2
    for name in ("meta_loss_vs_time.png", "meta_loss_vs_inner_steps.png", "heldout.png"):
        assert (sweep / name).exists()
    r = _cli(["metaopt.cli.report", str(tmp_path / "nope")], tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: sweep_dir")
