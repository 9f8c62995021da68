"""Packaging hook: ship the top-level ``conf/`` (the source of truth) inside the wheel as
``metaopt/conf`` so an installed ``metaopt-train/-eval/-report`` finds its configs (hydra's
"installed app" layout). Everything else lives in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_conf(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads conf/ from the source tree
        src = ROOT / "conf"
        if src.is_dir():
            dst = Path(self.build_lib) / "metaopt" / "conf"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": build_py_with_conf})
