"""Execute the notebooks with a real Jupyter kernel (nbclient), store them WITH their outputs,
and write the figures the README shows to docs/figures/.

    python notebooks/run_all.py                # all notebooks, full settings (a few minutes, 1 thread)
    python notebooks/run_all.py 02 04          # only notebooks whose names start with 02 / 04
    python notebooks/run_all.py --small --no-save   # tiny settings, check only (what the tests run)

Each notebook runs in a fresh temporary working directory (its runs/ output goes there, not into
the repository). A code cell tagged ``figure:<name>`` has its first PNG output written to
``docs/figures/<name>.png``. ``METAOPT_NB_SMALL=1`` (``--small``) selects the notebooks' tiny
settings; figures are only written from full-settings runs.
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

NB_DIR = Path(__file__).resolve().parent
FIG_DIR = NB_DIR.parent / "docs" / "figures"
SMALL_ENV = "METAOPT_NB_SMALL"


def notebooks(prefixes=()) -> list:
    found = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    return found


def execute(path: Path, small: bool = False, workdir: Optional[Path] = None, timeout: int = 600):
    """Run every cell of ``path`` in a fresh python3 kernel; returns the executed notebook.
    A cell error raises ``nbclient.exceptions.CellExecutionError``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = os.environ.get(SMALL_ENV)
    os.environ[SMALL_ENV] = "1" if small else "0"  # the kernel inherits this environment
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cwd = Path(workdir) if workdir is not None else Path(tmp)
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": str(cwd)}}, record_timing=False)
            client.execute()
    finally:
        if old is None:
            os.environ.pop(SMALL_ENV, None)
        else:
            os.environ[SMALL_ENV] = old
    return nb


def figures(nb) -> Dict[str, bytes]:
    """``figure:<name>`` tag -> PNG bytes of that cell's first image output."""
    out = {}
    for cell in nb.cells:
        tags = [t for t in cell.get("metadata", {}).get("tags", []) if t.startswith("figure:")]
        if not tags or cell.cell_type != "code":
            continue
        png = next((o["data"]["image/png"] for o in cell.get("outputs", [])
                    if "image/png" in o.get("data", {})), None)
        if png is None:
            raise RuntimeError(f"cell tagged {tags[0]} produced no PNG output")
        for t in tags:
            out[t.split(":", 1)[1]] = base64.b64decode(png)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prefixes", nargs="*", help="only notebooks whose file names start with these")
    p.add_argument("--small", action="store_true", help=f"tiny settings ({SMALL_ENV}=1)")
    p.add_argument("--no-save", action="store_true", help="execute only; leave the .ipynb files as they are")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    a = p.parse_args(argv)
    import nbformat

    paths = notebooks(a.prefixes)
    if not paths:
        print(f"error: no notebooks match {a.prefixes}", file=sys.stderr)
        return 2
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path, small=a.small, timeout=a.timeout)
        msg = f"{path.name}: executed in {time.perf_counter() - t0:.0f} s"
        if not a.no_save:
            nbformat.write(nb, path)
            msg += ", saved with outputs"
            if not a.small:
                FIG_DIR.mkdir(parents=True, exist_ok=True)
                for name, png in figures(nb).items():
                    (FIG_DIR / f"{name}.png").write_bytes(png)
                    msg += f", docs/figures/{name}.png"
        print(msg, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
