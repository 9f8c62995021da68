"""The learned optimizer's figures quoted in the README and docs/learned-optimizer.md equal the
files the committed commands wrote (benchmarks/results/), so a stale quote fails here."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOC = (ROOT / "docs" / "learned-optimizer.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"


def _summary_rows(path):
    """optimizer -> (IQM, median, min, >= 1x, diverged) from a summary.md's per-optimizer table."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"\d+", cells[1]) and cells[0] != "optimizer":
            out[cells[0]] = (float(cells[2]), float(cells[3]), float(cells[4]), int(cells[5]),
                             int(cells[6]), int(cells[1]))
    return out


def test_final_half_table_equals_the_recorded_summary():
    rows = _summary_rows(RESULTS / "suite_final" / "summary.md")
    names = {"learned": "anchored (the default)", "adam": "`Adam(lr=3e-3)`",
             "adamw": "`AdamW` (defaults)", "muon": "`Muon` (defaults) on hidden matrices + AdamW",
             "prodigy": "Prodigy (lr 1.0)", "schedulefree": "schedule-free AdamW (defaults)",
             "adam(tuned)": "Adam, lr tuned per problem (the reference)"}
    for opt, label in names.items():
        iqm, med, mn, ge1, div, n = rows[opt]
        m = re.search(rf"\| (\*\*)?{re.escape(label)}(\*\*)? \| (\*\*)?([\d.]+)(\*\*)? \| ([\d.]+) \| "
                      rf"([\d.]+) \| (\d+)/(\d+) \| (\d+) \|", DOC)
        assert m, label
        assert (float(m.group(4)), float(m.group(6)), float(m.group(7)), int(m.group(8)),
                int(m.group(9)), int(m.group(10))) == (iqm, med, mn, ge1, n, div), label


def test_readme_quotes_the_final_half_iqms():
    rows = _summary_rows(RESULTS / "suite_final" / "summary.md")
    for opt in ("learned", "adam", "prodigy"):
        assert f"{rows[opt][0]:.2f}" in README, opt


def test_long_horizon_and_design_tables_equal_the_recorded_runs():
    long = _summary_rows(RESULTS / "suite_final_long" / "summary.md")["learned"]
    old = _summary_rows(RESULTS / "suite_final_long_pertensor" / "summary.md")["learned"]
    assert f"| IQM | {long[0]:.3f} | {old[0]:.3f} |" in DOC
    probe = (RESULTS / "design_probe.txt").read_text()
    for prob, a, p in re.findall(r"^(\w+) default=([\d.]+) pertensor=([\d.]+)$", probe, re.M):
        assert f"| {prob} | {a} | {p} |" in DOC, prob
    for name, val in re.findall(r"^(default|pertensor): IQM ([\d.]+)", probe, re.M):
        assert val in DOC, name


def test_cost_quote_equals_the_benchmark_output():
    text = (RESULTS / "bench_default.txt").read_text()
    step = re.search(r"from_pretrained\('default'\)\s+([\d.]+) ms\s+\S+\s+([\d.]+)x\s+([\d.]+) ms\s+\S+\s+([\d.]+)x", text)
    assert step, text
    assert f"{step.group(1)} ms | **{step.group(2)}x**" in DOC
    assert f"{step.group(3)} ms | **{step.group(4)}x**" in DOC
    assert f"{step.group(2)}x" in README
