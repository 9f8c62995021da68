"""State-dict hooks of the wrapper optimizers (Lookahead, Lookbehind, SLRLA) behave as in
``torch.optim.Optimizer``: the logic of PyTorch's own ``test_state_dict_pre_hook``,
``test_state_dict_post_hook``, ``test_state_dict_pre_post_hook`` and the
``load_state_dict`` pre/post hook tests (test/optim/test_optim.py), with ``torch.optim.SGD`` as
the control. A pre hook's entry in ``opt.state`` must reach the post hook inside
``state_dict()``."""
from copy import deepcopy
from typing import Any, Dict

import pytest
import torch
from torch import nn

from metaopt.optim import SLRLA, Lookahead, Lookbehind


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
    "lookahead": lambda ps: Lookahead(torch.optim.SGD(ps, lr=0.01, momentum=0.9), k=2),
    "lookbehind": lambda ps: Lookbehind(torch.optim.SGD(ps, lr=0.01), k=2),
    "slrla": lambda ps: SLRLA(ps, lr=0.01, k=2),
}


def _stepped(name):
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    return model, opt


# the hooks of PyTorch's test_optim.py
def _state_dict_pre_hook(optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict: Dict[str, Any]) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    my_state_dict = deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_pre_hook(name):
    _, opt = _stepped(name)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_post_hook(name):
    _, opt = _stepped(name)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_pre_post_hook(name):
    _, opt = _stepped(name)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"]
    assert sd["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_pre_hook_and_prepend(name):
    _, opt = _stepped(name)
    sd = opt.state_dict()
    model2 = _model()
    opt2 = OPTIMIZERS[name](model2.parameters())
    opt2.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.002
    opt2.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    opt2.load_state_dict(sd)
    # hook1 runs after hook2 (prepended), on the dict hook2 returned
    assert opt2.param_groups[0]["lr"] == 0.002


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_post_hook(name):
    _, opt = _stepped(name)
    model2 = _model()
    opt2 = OPTIMIZERS[name](model2.parameters())
    opt2.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state["ran_load_state_dict_pre_hook2"] is False
    assert opt2.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_pre_post_hook(name):
    _, opt = _stepped(name)
    model2 = _model()
    opt2 = OPTIMIZERS[name](model2.parameters())
    opt2.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    opt2.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state["ran_load_state_dict_pre_hook2"] is True
    assert opt2.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_parameter_state_round_trips_and_steps_continue(name):
    """A non-parameter entry in ``state`` survives a round trip and does not disturb stepping."""
    model, opt = _stepped(name)
    opt.state["note"] = {"x": 1}
    sd = deepcopy(opt.state_dict())   # torch shares state tensors between the two otherwise
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = OPTIMIZERS[name](model2.parameters())
    opt2.load_state_dict(sd)
    assert opt2.state["note"] == {"x": 1}
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for m, o in ((model, opt), (model2, opt2)):
        def closure(m=m, o=o):
            o.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss
        o.step(closure)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
