"""The benchmark runs end to end (quick mode) and writes every case and engine.

Timing is not a test: nothing here compares a time with a threshold. This only
proves that scripts/bench.py still builds the official model and export, that
every worker runs, and that the JSON and markdown reports are complete.
"""

import json
import subprocess
import sys

import pytest

from minisam import ROOT, load_script

bench = load_script("bench")


def test_quick_bench_writes_every_case_and_engine(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    expected_cases = [c for c in bench.CASES if c != "vitb"]
    assert sorted(report["results"]) == sorted(expected_cases)
    for case in expected_cases:
        assert sorted(report["results"][case]) == sorted(bench.CASES[case]), case
        for engine, r in report["results"][case].items():
            assert r["n"] >= 1 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"], (case, engine, r)
            assert r["peak_rss_mb"] > 0, (case, engine)
            assert f"| {case} | {engine} |" in md
    targets = {(row["case"], row["vs"]) for row in report["ratios"]}
    for case, other in bench.TARGETS:
        if case in expected_cases:
            assert (case, other) in targets
    assert ("cold", "seconds") in targets
    assert report["meta"]["quick"] is True


def test_ratio_rows_compare_against_the_issue_targets():
    results = {"decoder1": {"npsam": {"median_s": 0.02}, "torch": {"median_s": 0.05}, "ort": {"median_s": 0.03}},
               "cold": {"npsam": {"median_s": 0.3}, "torch": {"median_s": 1.2}, "ort": {"median_s": 0.5}}}
    rows = {(r["case"], r["vs"]): r for r in bench.ratios(results)}
    assert rows[("decoder1", "torch")]["ratio"] == pytest.approx(0.02 / 0.05) and rows[("decoder1", "torch")]["met"] is True
    assert rows[("decoder1", "ort")]["target"] is None and rows[("decoder1", "ort")]["met"] is None
    assert rows[("cold", "seconds")]["met"] is False
