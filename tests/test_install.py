"""A wheel install (not editable) gives working metaopt-train: configs ship inside the package.

Builds a wheel from this checkout, installs it into a fresh venv (with the system site-packages
for torch & co., no network), and runs the installed ``metaopt-train`` from a directory outside
the source tree. Slow (~30 s): ``python -m pytest -m slow tests/test_install.py``.
"""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=300):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-1500:]}\n{r.stderr[-2500:]}"
    return r


@pytest.mark.slow
def test_wheel_install_runs_metaopt_train(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or "") and not os.environ.get("METAOPT_SLOW"):
        pytest.skip("slow (~45 s): run with -m slow or METAOPT_SLOW=1")
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", wheels, ROOT], cwd=tmp_path)
    (whl,) = wheels.glob("metaopt-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # install with the outer pip into the venv's site-packages (the venv has no pip of its own)
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=tmp_path).stdout.strip()
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
          "--target", site, "--upgrade", whl], cwd=tmp_path)
    bindir = Path(site) / "bin"  # --target puts console scripts here
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    where = _run([py, "-c", "import metaopt, metaopt.cli.common as c; print(metaopt.__file__); "
                            "print(c.CONF_DIR)"], cwd=work, env=env).stdout.split()
    assert where[0].startswith(site), f"imported {where[0]}, not the installed wheel"
    assert where[1] == str(Path(site) / "metaopt" / "conf")
    train = [py, bindir / "metaopt-train"]
    r = _run(train + ["--cfg", "job"], cwd=work, env=env)
    assert "outer_steps" in r.stdout and "task" in r.stdout
    run = work / "run"
    _run(train + ["meta.outer_steps=2", "meta.meta_batch=2", "meta.horizon=6",
                  "meta.progress=false", f"hydra.run.dir={run}"], cwd=work, env=env)
    ckpt = run / "checkpoints" / "last"
    assert (ckpt / "theta.safetensors").is_file() and (ckpt / "rule.json").is_file()
