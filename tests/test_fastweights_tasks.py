"""The ``assoc_retrieval`` task family (Ba et al.'s retrieval task for metaopt-train/-eval):
the registry contract (reproducible, vmappable, config round trip, trainable) and its config."""
import pytest
import torch
from torch.func import grad, vmap

from metaopt.tasks import FAMILIES, make_family
from metaopt.tasks.retrieval import AssocRetrievalFamily, decode_retrieval

SMALL = dict(num_examples=1300, hidden=8, embed=8, batch_sizes=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registered():
    assert FAMILIES["assoc_retrieval"] is AssocRetrievalFamily


def test_splits_follow_ba_proportions_and_format():
    fam = make_family("assoc_retrieval", num_examples=1300)
    sizes = [fam.data.size(s) for s in ("train", "valid", "test")]
    assert sizes == [1000, 100, 200]
    x, y = fam.data.full("test")
    s = decode_retrieval(x[0])
    assert s[8:10] == "??" and int(s[s[:8:2].index(s[-1]) * 2 + 1]) == int(y[0])


def test_sampling_reproducible_and_config_round_trip():
    fam = make_family("assoc_retrieval", **{**SMALL, "hidden": [8, 12]})
    a, b = fam.sample_seeded(3), fam.sample_seeded(3)
    assert a.signature == b.signature and a.init_scale == b.init_scale
    again = make_family("assoc_retrieval", **fam.config())
    c = again.sample_seeded(3)
    pa, pc = (t.init_params(torch.Generator().manual_seed(0)) for t in (a, c))
    assert a.signature == c.signature and all(torch.equal(pa[k], pc[k]) for k in pa)


def test_vmap_matches_loop():
    fam = make_family("assoc_retrieval", **SMALL)
    tasks = [fam.sample_seeded(s) for s in (1, 2)]
    assert tasks[0].signature == tasks[1].signature
    g = torch.Generator().manual_seed(0)
    params = [t.init_params(g) for t in tasks]
    batches = [t.sample_batch("train", g) for t in tasks]
    stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
    xs = tuple(torch.stack(parts) for parts in zip(*batches))
    out = vmap(lambda p, x: tasks[0].apply(p, tasks[0].buffers, x))(stacked, xs)
    ref = torch.stack([t.apply(p, t.buffers, x) for t, p, x in zip(tasks, params, batches)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_gradient_descent_lowers_loss():
    # one pair ("c9??c -> 9"): the RNN must carry the digit over 3 steps
    task = make_family("assoc_retrieval", **{**SMALL, "num_pairs": 1, "hidden": 16}).sample_seeded(0)
    g = torch.Generator().manual_seed(0)
    params = task.init_params(g)
    before = task.evaluate(params, "valid")
    gl = grad(task.loss)
    for _ in range(150):
        gr = gl(params, task.sample_batch("train", g))
        params = {k: params[k] - 0.5 * gr[k] for k in params}
    after = task.evaluate(params, "valid")
    assert after < 0.7 * before, (before, after)  # chance level is log(10) = 2.30


def test_bad_options():
    with pytest.raises(ValueError, match="num_pairs"):
        make_family("assoc_retrieval", num_pairs=0)
    with pytest.raises(ValueError, match="num_examples"):
        make_family("assoc_retrieval", num_examples=5)


def test_structured_config_builds_the_family():
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from metaopt.cli.config import build_family, register_configs
    register_configs()
    node = ConfigStore.instance().repo["task"]["assoc_retrieval.yaml"].node
    cfg = OmegaConf.structured(node)
    cfg.num_examples = 1300
    fam = build_family(cfg)
    assert isinstance(fam, AssocRetrievalFamily) and fam.num_pairs == 4
