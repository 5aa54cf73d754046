"""The benchmark runs end to end (quick mode) and writes every case and engine.

Timing is not a test: nothing here compares a time with a threshold. This only
proves that scripts/bench.py still builds the official model and export, that
every worker runs, and that the JSON and markdown reports are complete.
"""

import json
import statistics
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
    expected_cases = [c for c in bench.CASES if c not in bench.SLOW_CASES]
    assert sorted(report["results"]) == sorted(expected_cases)
    for case in expected_cases:
        assert sorted(report["results"][case]) == sorted(bench.CASES[case]), case
        for engine, r in report["results"][case].items():
            assert r["n"] >= 1 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"], (case, engine, r)
            assert r["peak_rss_mb"] > 0, (case, engine)
            assert f"| {case} | {engine} |" in md
    for row in report["ratios"]:
        if row["vs"] in bench.CASES[row["case"]]:  # against another engine: paired round by round
            n, o = (report["results"][row["case"]][e]["round_medians_s"] for e in ("npsam", row["vs"]))
            assert len(n) == len(o) >= 1, row  # one round, or two cold processes each
            assert row["paired"] == pytest.approx(statistics.median(a / b for a, b in zip(n, o))), row
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
    assert rows[("decoder1", "torch")]["paired"] is None  # no rounds recorded


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    # the machine slows down in rounds 2 and 3: both engines' times move, the per-round ratios less
    results = {"onnx1": {"npsam": {"median_s": 0.06, "round_medians_s": [0.04, 0.06, 0.07]},
                         "torch": {"median_s": 0.1, "round_medians_s": [0.1, 0.1, 0.1]},
                         "ort": {"median_s": 0.07, "round_medians_s": [0.05, 0.07, 0.09]}}}
    rows = {(r["case"], r["vs"]): r for r in bench.ratios(results)}
    assert rows[("onnx1", "ort")]["ratio"] == pytest.approx(0.06 / 0.07)
    assert rows[("onnx1", "ort")]["paired"] == pytest.approx(0.8)  # median of 0.8, 0.857, 0.778
    assert rows[("onnx1", "torch")]["paired"] == pytest.approx(0.6)


def test_new_cases_targets_and_peak_row():
    """The issue's targets for the TinyViT, ViT-B/onnxruntime and segment cases, and
    TinyViT's peak memory against onnxruntime's (their workers run in the full run only)."""
    results = {"tinyvit": {"npsam": {"median_s": 0.6, "peak_rss_mb": 400}, "torch": {"median_s": 1.1, "peak_rss_mb": 700},
                           "ort": {"median_s": 0.4, "peak_rss_mb": 500}},
               "vitb_ort": {"npsam": {"median_s": 5.0, "peak_rss_mb": 600}, "ort": {"median_s": 6.0, "peak_rss_mb": 7000}},
               "segment": {"npsam": {"median_s": 1.2, "peak_rss_mb": 380}, "torch": {"median_s": 2.7, "peak_rss_mb": 600},
                           "ort": {"median_s": 0.85, "peak_rss_mb": 410}}}
    rows = {(r["case"], r["vs"]): r for r in bench.ratios(results)}
    assert rows[("tinyvit", "ort")]["target"] == 1.5 and rows[("tinyvit", "ort")]["met"] is True
    assert rows[("tinyvit", "peak / ort peak")]["ratio"] == pytest.approx(0.8)
    assert rows[("tinyvit", "peak / ort peak")]["met"] is True
    assert rows[("vitb_ort", "ort")]["target"] == 0.8 and rows[("vitb_ort", "ort")]["met"] is False
    assert rows[("segment", "ort")]["target"] == 1.3 and rows[("segment", "ort")]["met"] is False
    assert rows[("segment", "torch")]["target"] is None
    assert set(bench.SLOW_CASES) == {"vitb", "vitb_ort", "tinyvit", "segment"}


def test_segment_case_runs_the_readme_command(tmp_path):
    """npsam's segment sample is the command line itself, in a fresh process; the
    others are workers."""
    argv = bench.command("npsam", "segment", str(tmp_path), 0, 1)
    assert argv[1:] == ["-m", "npsam", "segment", "assets/images/truck.jpg", "--point", "500,375",
                        "-o", str(tmp_path / "out-npsam")]
    assert (ROOT / argv[4]).is_file()
    assert bench.command("ort", "segment", str(tmp_path), 0, 1)[1:4] == [bench.WORKER, "--engine", "ort"]
