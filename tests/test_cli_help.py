"""The ``metaopt`` command (and ``python -m metaopt``) and every entry point's ``--help``: a real
description, the config groups of that app only, examples; no raw config dump."""
import subprocess
import sys

import pytest

from metaopt.cli.main import COMMANDS, main


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_python_m_metaopt_lists_the_subcommands():
    r = _run("-m", "metaopt", "--help")
    assert r.returncode == 0, r.stderr
    for name in ("train", "eval", "report", "fastweights"):
        assert f"\n  {name} " in r.stdout, r.stdout
    assert set(COMMANDS) == {"train", "eval", "report", "fastweights"}


def test_unknown_subcommand_is_one_line(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trian" in err[0] and "train" in err[0]


@pytest.mark.parametrize("app,groups,not_groups", [
    ("train", ["task", "rule", "scheme", "meta", "local"], ["eval", "speedup", "optimizer"]),
    ("eval", ["task", "eval", "optimizer"], ["rule", "scheme", "meta", "local"]),
])
def test_hydra_app_help(app, groups, not_groups):
    r = _run("-m", "metaopt", app, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.startswith(f"metaopt-{app}: ")
    assert "Powered by Hydra" not in out and "== Config ==" not in out
    assert len(out.splitlines()) < 40, out
    section = out.split("== Config groups")[1].split("== Examples")[0]
    listed = [l.split()[0] for l in section.splitlines()[1:] if l.startswith("  ") and
              not l.startswith("    ")]
    for g in groups:
        assert g in listed, section
    for g in not_groups:
        assert g not in listed, section
    assert out.count(f"metaopt-{app} ") >= 3        # three examples
    if app == "train":
        assert "pertensor" in section and "nested" in section and "mixture" in section


@pytest.mark.parametrize("app,words", [
    ("report", ["sweep directory", "report.csv", "--eval-steps", "held-out"]),
    ("fastweights", ["retrieval", "capacity", "examples"]),
])
def test_argparse_app_help(app, words):
    r = _run("-m", "metaopt", app, "--help")
    assert r.returncode == 0, r.stderr
    for w in words:
        assert w in r.stdout, r.stdout
    desc = r.stdout.split("\n\n")[1]
    assert desc.rstrip().endswith((".", "MSE", "error")), desc    # not cut mid-sentence


def test_report_options_have_help():
    r = _run("-m", "metaopt.cli.report", "--help")
    opts = r.stdout.split("options:")[1]
    for opt in ("--eval-steps", "--eval-tasks", "--seed"):
        line = opts.split(opt, 1)[1].split("\n  -", 1)[0]
        assert len(line.split()) > 3, (opt, line)
