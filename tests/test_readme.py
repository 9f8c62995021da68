"""The README is a front door that stays true: short, its quoted numbers equal the files the
committed scripts wrote, every docs page it links exists, and (slow tier) its main job re-run
prints what it quotes."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAIN_JOB = ROOT / "benchmarks" / "results" / "main_job.json"

sys.path.insert(0, str(ROOT / "benchmarks"))


def _quoted_main_job() -> str:
    m = re.search(r"<!-- main-job -->\n(.*?)\n<!-- /main-job -->", README, re.S)
    assert m, "README: the main job's output block (<!-- main-job -->) is missing"
    return m.group(1).strip()


def test_readme_is_short_and_has_no_session_notes():
    assert len(README.splitlines()) <= 200
    for bad in (r"\bissue \d+", r"\bissue-\d+", r"\bthis session\b", r"\bI (tried|stopped|ran)\b"):
        assert not re.search(bad, README, re.I), bad


def test_readme_main_job_quote_equals_the_recorded_output():
    from main_job import readme_line
    recorded = json.loads(MAIN_JOB.read_text())
    assert _quoted_main_job() == readme_line(recorded)


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_docs_pages_have_no_session_notes():
    for page in (ROOT / "docs").glob("*.md"):
        text = page.read_text()
        for bad in (r"\bissue \d+", r"\bissue-\d+", r"\bthis session\b", r"\bI (tried|stopped)\b"):
            assert not re.search(bad, text, re.I), (page.name, bad)


def test_readme_commands_use_existing_config_groups():
    """Every `group=option` the README's commands choose exists (a renamed option fails here,
    not in a user's shell)."""
    import metaopt.cli.train  # noqa: F401  (registers the structured config groups)
    from metaopt.cli.common import group_options
    for group, option in re.findall(r"(?<![\w.+/])(task|rule|scheme|optimizer|local)=([\w,]+)",
                                    README):
        options = group_options(group).split(", ")
        for o in option.split(","):
            assert o in options, (group, o, options)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_main_job_reruns_to_the_quoted_output(tmp_path):
    """Re-run the README's main job from scratch (a few minutes on 2 cores) and compare."""
    out = tmp_path / "main_job.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "main_job.py"),
                        "--run", str(tmp_path / "runs" / "default"), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    now, recorded = json.loads(out.read_text()), json.loads(MAIN_JOB.read_text())
    assert now["final_meta_loss"] == pytest.approx(recorded["final_meta_loss"], abs=0.01)
    for problem, sp in recorded["speedup"].items():
        assert now["speedup"][problem] == pytest.approx(sp, abs=0.01), problem
    assert now["diverged"] == recorded["diverged"]
    assert r.stdout.strip().splitlines()[-1] == _quoted_main_job()


def _readme_command(prefix: str) -> str:
    """The README's first shell command that starts with ``prefix``."""
    for line in re.findall(r"```bash\n(.*?)```", README, re.S):
        for cmd in line.splitlines():
            if cmd.startswith(prefix):
                return cmd
    raise AssertionError(f"README: no command starting with {prefix!r}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_scheme_sweep_and_report_run(tmp_path):
    """The README's scheme comparison (a 3-job multirun, then ``metaopt report``) runs after the
    README's install, with the outer loop cut to 3 steps; the report has one row per scheme."""
    import shlex
    sweep = shlex.split(_readme_command("metaopt train -m scheme="))
    sweep = [a if not a.startswith("meta.outer_steps=") else "meta.outer_steps=3" for a in sweep]
    report = shlex.split(_readme_command("metaopt report runs/schemes"))
    report = [a if a != "200" else "20" for a in report]
    main = [sys.executable, "-m", "metaopt"]
    r = subprocess.run(main + sweep[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(main + report[1:], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "runs" / "schemes" / "report.md").read_text()
    for scheme in ("nested", "interleaved", "continuous"):
        assert f"scheme={scheme}" in rows, rows
