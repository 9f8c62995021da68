"""Every conf/optimizer/*.yaml builds a torch optimizer from params (``_partial_``), forwards a
top-level ``lr`` to where the step size lives, and trains a small nn.Linear for 3 steps through
``opt.step(closure)`` -- the contract metaopt-eval relies on."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

CONF = Path(__file__).resolve().parent.parent / "conf"
NAMES = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
REQUIRED = {"sgd", "momentum", "adam", "lookahead", "lookbehind", "slrla", "sgd_hd", "adam_hd"}


def test_all_baselines_have_a_config():
    assert REQUIRED <= set(NAMES)


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 3, generator=g) + 0.1 * torch.randn(64, 3, generator=g)
    return model, x, y


def _train(make_opt, steps=3):
    model, x, y = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_opt(list(model.named_parameters()))  # what metaopt-eval passes
    assert isinstance(opt, torch.optim.Optimizer)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        start = float(((model(x) - y) ** 2).mean())
    for _ in range(steps):
        loss = opt.step(closure)
        assert loss is not None and torch.isfinite(loss)
    with torch.no_grad():
        end = float(((model(x) - y) ** 2).mean())
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return opt, start, end, moved


@pytest.mark.parametrize("name", NAMES)
def test_config_instantiates_and_takes_three_steps(name):
    cfg = OmegaConf.load(CONF / "optimizer" / f"{name}.yaml")
    assert cfg.get("_partial_") is True, "params are bound later by the caller"
    assert "lr" in cfg, "metaopt-eval tunes the top-level lr"
    opt, start, end, moved = _train(instantiate(cfg))
    assert moved
    assert end < start, f"{name}: loss {start} -> {end} after 3 steps"


@pytest.mark.parametrize("name", NAMES)
def test_lr_override_reaches_the_optimizer(name):
    """Composed as a config group, as metaopt-eval does, with ``optimizer.lr`` overridden."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=[f"+optimizer={name}", "optimizer.lr=0.0123"])
    make_opt = instantiate(cfg.optimizer)
    model, _, _ = _linear_problem()
    opt = make_opt(list(model.named_parameters()))
    assert all(g["lr"] == pytest.approx(0.0123) for g in opt.param_groups)
    if hasattr(opt, "optimizer"):  # wrappers share the inner optimizer's groups
        assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.0123)


def test_slrla_milestones_follow_the_eval_step_budget():
    """Under conf/eval.yaml, SLRLA's fractional milestones scale with eval.steps."""
    if not (CONF / "eval.yaml").exists():
        pytest.skip("no conf/eval.yaml")
    from metaopt.cli.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="eval", overrides=["optimizer=slrla", "eval.steps=200"])
    model, _, _ = _linear_problem()
    opt = instantiate(cfg.optimizer)(list(model.named_parameters()))
    assert opt.defaults["milestones"] == [60, 120, 160]
