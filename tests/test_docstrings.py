"""Every public name (``metaopt.__all__`` and each subpackage's ``__all__``) has its own
docstring, so ``help()`` and the API reference (docs/api.md, mkdocstrings) show it; every entry
point module has one too."""
import importlib
import inspect

import pytest

PACKAGES = ["metaopt", "metaopt.tasks", "metaopt.rules", "metaopt.meta", "metaopt.optim",
            "metaopt.interop", "metaopt.viz", "metaopt.fastweights"]
ENTRY_MODULES = ["metaopt.cli.main", "metaopt.cli.train", "metaopt.cli.evaluate",
                 "metaopt.cli.report", "metaopt.fastweights.experiments", "metaopt.__main__"]

def _own_doc(obj):
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return (doc or "").strip()


def _public(pkg):
    mod = importlib.import_module(pkg)
    assert hasattr(mod, "__all__"), f"{pkg} has no __all__"
    for name in mod.__all__:
        obj = getattr(mod, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            yield name, obj


@pytest.mark.parametrize("pkg", PACKAGES)
def test_public_names_have_docstrings(pkg):
    missing = sorted(n for n, obj in _public(pkg) if not _own_doc(obj))
    assert not missing, f"{pkg}: no docstring: {missing}"


def test_named_api_docstrings():
    import metaopt
    for obj in (metaopt.LearnedOptimizer, metaopt.MetaTrainer, metaopt.make_rule,
                metaopt.make_scheme):
        assert _own_doc(obj), obj


@pytest.mark.parametrize("name", ENTRY_MODULES)
def test_entry_points_have_module_docstrings(name):
    assert (importlib.import_module(name).__doc__ or "").strip()
