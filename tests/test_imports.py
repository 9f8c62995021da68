"""Import arrows point down: cli -> meta/optim/interop/viz -> rules/tasks/fastweights -> types.

Every module of the package is imported (so the list below is real), and its source is parsed
for every ``import`` statement, including the lazy ones inside functions (a dynamic check could
not see those, and ``metaopt/__init__.py`` re-exports the public API, so importing any module
loads them all). A module may import from its own subpackage and from lower layers only, plus:

* ``tasks`` never imports ``rules`` and ``rules`` never imports ``tasks``; ``optim`` imports
  neither ``meta`` nor ``tasks`` (a user's torch.optim drop-in needs rules and types only);
* the schemes (meta/nested, interleaved, continuous, es) never import each other -- shared
  machinery lives in meta/engine.py, meta/unroll.py and meta/schemes.py;
* no module imports another module's private (``_name``) helper, and no module reaches into a
  private torch API where a public one exists.
"""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import metaopt

ROOT = Path(metaopt.__file__).resolve().parent
LAYER = {"types": 0, "activations": 0,
         "rules": 1, "tasks": 1, "fastweights": 1,
         "meta": 2, "optim": 2, "interop": 2, "viz": 2,
         "cli": 3, "__main__": 3}   # python -m metaopt: the cli dispatcher
FORBIDDEN = {("tasks", "rules"), ("rules", "tasks"), ("optim", "meta"), ("optim", "tasks")}
SCHEMES = {"metaopt.meta.nested", "metaopt.meta.interleaved", "metaopt.meta.continuous",
           "metaopt.meta.es"}

# Known exceptions, each with its reason; a new one fails the test.
PRIVATE_OK: set = set()   # none: a helper used by another module is public
TORCH_PRIVATE_OK = {
    "torch._foreach_",          # the multi-tensor kernels torch.optim itself uses; no public API
    "torch.utils._pytree",      # torchopt's pytrees (interop/torchopt.py); torch has no public one
    "torch._disable_dynamo",    # optim/lookahead.py: keeps dynamo out of in-place slow weights
    "torch._dynamo",
}


def _modules():
    names = ["metaopt"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="metaopt."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


def _source(name):
    mod = importlib.import_module(name)
    return Path(mod.__file__).read_text(), mod


def _imports(tree, name):
    """(imported module, imported name or None) for every import statement."""
    pkg = name if name.count(".") == 0 else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                yield base, a.name


def _layer_of(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "metaopt" else None


def test_every_module_is_listed_in_a_layer():
    top = {_layer_of(m) for m in MODULES if m != "metaopt"}
    assert top <= set(LAYER) | {"pretrained"}, f"new subpackage(s) without a layer: {top - set(LAYER)}"


def _violations(name, tree):
    here = _layer_of(name)
    bad = []
    for target, imported in _imports(tree, name):
        full = f"{target}.{imported}" if imported else target
        if target.startswith("metaopt"):
            there = _layer_of(target)
            if there is None and imported is not None:  # "from metaopt import x"
                there = imported if imported in LAYER else None
            if name == "metaopt":  # the package's public API re-exports from everywhere
                continue
            if here and there and here != there:
                if LAYER[there] > LAYER[here]:
                    bad.append(f"upward: {name} ({here}) imports {full} ({there})")
                elif (here, there) in FORBIDDEN:
                    bad.append(f"forbidden: {name} imports {full}")
            if name in SCHEMES and target in SCHEMES and target != name:
                bad.append(f"scheme {name} imports scheme {target}")
            if imported and imported.startswith("_") and not imported.startswith("__") \
                    and target != name and (target, imported) not in PRIVATE_OK:
                bad.append(f"private helper: {name} imports {target}.{imported}")
        if target.startswith("torch") and (
                any(p.startswith("_") for p in target.split(".")) or
                (imported or "").startswith("_")):
            if not any(full.startswith(ok) for ok in TORCH_PRIVATE_OK):
                bad.append(f"private torch API: {name} imports {full}")
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):  # whole torch._x attribute chains (torch._C..., torch.utils._pytree)
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "torch":
                dotted = ".".join(["torch"] + chain[::-1])
                if any(p.startswith("_") and not p.startswith("__") for p in chain) and \
                        not any(dotted.startswith(ok) for ok in TORCH_PRIVATE_OK):
                    bad.append(f"private torch API: {name} uses {dotted}")
    return sorted(set(bad))


@pytest.mark.parametrize("name", MODULES)
def test_imports_point_down(name):
    text, _ = _source(name)
    bad = _violations(name, ast.parse(text))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name,line", [
    ("metaopt.rules.x", "from metaopt.meta.unroll import unroll"),      # upward
    ("metaopt.types", "import metaopt.tasks.base"),                     # upward, plain import
    ("metaopt.optim.x", "from metaopt.tasks.base import Task"),         # down, but forbidden
    ("metaopt.tasks.x", "from metaopt.rules import make_rule"),         # sideways, forbidden
    ("metaopt.meta.nested", "from metaopt.meta.es import ES"),          # scheme -> scheme
    ("metaopt.meta.trainer", "from metaopt.tasks.data import _helper"),  # private helper
    ("metaopt.meta.x", "from torch._C import _functions"),              # private torch
    ("metaopt.meta.x", "x = torch.utils._foo.bar"),                     # private torch
])
def test_the_check_catches_bad_imports(name, line):
    """The checker itself, on one-line modules (lazy imports inside a function included)."""
    assert _violations(name, ast.parse(f"def f():\n    {line}\n")), line
