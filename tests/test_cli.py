"""Command line: ``python -m rnnfast info`` and ``python -m rnnfast bench`` (smoke runs in
subprocesses, no timing assertions) and the bench's correctness check."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from rnnfast import bench, bench_cases


def _run(*args, timeout=600):
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", "rnnfast", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_info_runs():
    p = _run("info")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    import rnnfast
    assert f"rnnfast {rnnfast.__version__}" in out
    for word in ("backends:", "auto dispatch", "threads:", "cython kernels:", "numba", "blas", "cpu:", "simd:",
                 "versions:"):
        assert word in out, f"{word!r} missing from:\n{out}"


def test_info_json():
    p = _run("info", "--json", "--no-numba-trigger")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert "reference" in info["backends"]["available"]
    assert info["threads"]["rnnfast"] >= 1
    assert isinstance(info["cpu"]["simd"], list)
    assert isinstance(info["blas"], list)


def test_no_command_prints_help():
    p = _run()
    assert p.returncode == 2
    assert "bench" in p.stdout and "info" in p.stdout


def test_bench_quick_json(tmp_path):
    path = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401 - optional: the PNG is only asked for when it can be drawn
        extra = ["--png", str(png)]
    except ImportError:
        extra = []
    p = _run("bench", "--quick", "--only", "lstm-b1", "--json", str(path), *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    if extra:
        assert png.stat().st_size > 0
    assert "lstm-b1" in p.stdout
    assert "wall time" in p.stdout
    data = json.loads(path.read_text())
    meta = data["meta"]
    assert meta["rounds"] == 1 and meta["quick"] is True
    assert meta["backends"] == ["auto"]
    assert meta["wall_s"] > 0
    # the host line: the kernels' level, gcc's -march=native target, NumPy's BLAS
    from rnnfast.kernels import _isa
    assert f"# host: kernels {_isa.choose()[0]} (" in p.stdout and "NumPy BLAS" in p.stdout
    assert meta["host"]["isa"] == _isa.choose()[0]
    (rec,) = data["workloads"]
    assert rec["name"] == "lstm-b1"
    assert (rec["kind"], rec["T"], rec["B"], rec["I"], rec["H"]) == ("lstm", 100, 1, 256, 256)
    assert rec["flops"] == bench_cases.flops("lstm", 100, 1, 256, 256, {})
    res = rec["results"]
    mine = res["rnnfast:auto"]
    assert mine["status"] == "ok", mine
    assert mine["resolved"] in ("cython", "numba", "reference")
    assert mine["median_ms"] > 0 and mine["gflops"] > 0
    assert len(mine["times_s"]) == 1
    assert mine["max_err"] is not None and mine["max_err"] <= bench_cases.TOLERANCE
    assert set(mine["ratios"]) <= {"reference", "torch", "ort"}
    assert res["reference"]["status"] == "ok"
    assert mine["ratios"]["reference"] > 0
    for peer in ("torch", "ort"):
        if peer in res:               # present when installed
            assert res[peer]["status"] == "ok", res[peer]
            assert res[peer]["median_ms"] > 0
            assert mine["ratios"][peer] > 0


def test_bench_no_reference_and_backends(tmp_path):
    """--no-reference skips the reference peer; --backends names rnnfast's backends."""
    path = tmp_path / "b.json"
    p = _run("bench", "--quick", "--only", "lstm-b1", "--no-reference", "--backends", "reference",
             "--json", str(path))
    assert p.returncode == 0, p.stdout + p.stderr
    rec = json.loads(path.read_text())["workloads"][0]
    assert rec["results"]["reference"]["status"] == "skipped"
    assert rec["results"]["rnnfast:reference"]["status"] == "ok"


def test_bench_rejects_unknown_workload():
    p = _run("bench", "--quick", "--only", "no-such-workload")
    assert p.returncode == 2
    assert "unknown workload" in p.stderr


# ----------------------------------------------------------------------------- correctness check
def test_check_result_accepts_close():
    want = np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 4, 5)
    ok, err, msg = bench_cases.check_result(want + 1e-6, want)
    assert ok and err < 1e-5 and msg == ""


def test_check_result_catches_wrong_value():
    want = np.zeros((3, 4, 5), np.float32)
    got = want.copy()
    got[1, 2, 3] = 0.01
    ok, err, msg = bench_cases.check_result(got, want)
    assert not ok
    assert err == pytest.approx(0.01, rel=1e-5)
    assert msg.startswith("WRONG")


def test_check_result_catches_nan_and_shape():
    want = np.ones((2, 3))
    got = want.copy()
    got[0, 0] = np.nan
    ok, err, _ = bench_cases.check_result(got, want)
    assert not ok and math.isnan(err)
    ok, _, msg = bench_cases.check_result(np.ones((3, 2)), want)
    assert not ok and "shape" in msg


def test_check_result_lists_and_scale():
    """Training results are lists (dx, then gradients); errors are relative to the
    oracle's scale when it exceeds 1."""
    want = [np.ones(4), np.full(4, 500.0)]
    ok, err, _ = bench_cases.check_result([np.ones(4), np.full(4, 500.1)], want)
    assert ok and err == pytest.approx(0.1 / 500.0, rel=1e-3)
    ok, _, _ = bench_cases.check_result([np.ones(4), np.full(4, 501.0)], want)
    assert not ok
    ok, _, msg = bench_cases.check_result([np.ones(4)], want)
    assert not ok and "expected 2 arrays" in msg


def test_na_reason_classifies():
    assert bench_cases.na_reason(NotImplementedError("no training")) is not None
    assert bench_cases.na_reason(ImportError("no module")) is not None
    assert bench_cases.na_reason(AttributeError("module 'rnnfast' has no attribute 'MinGRU'")) is not None
    assert bench_cases.na_reason(ValueError("bad")) is None


def test_ratio_median_of_per_round_ratios():
    mine = bench.Entry("rnnfast:auto", "auto", times=[1.0, 2.0, 1.0])
    peer = bench.Entry("torch", "torch", times=[2.0, 2.0, 3.0])
    assert bench.ratio(peer, mine) == pytest.approx(2.0)       # median of 2, 1, 3
    once = bench.Entry("reference", "reference", times=[10.0], policy="once")
    assert bench.ratio(once, mine) == pytest.approx(10.0)      # against mine's median (1.0)
    assert math.isnan(bench.ratio(bench.Entry("ort", "ort"), mine))


def _quick_options():
    return bench.Options(names=["lstm-b1"], rounds=1, burst=1, warmup=1, pause=0.0, quick=True)


def test_run_workload_flags_wrong_result(monkeypatch):
    """A rnnfast result off the oracle is reported WRONG and not timed."""
    orig = bench.make_rf_fn

    def skewed(case, backend_name):
        fn = orig(case, backend_name)
        if backend_name == "reference":
            return fn
        return lambda: fn() + 0.01
    monkeypatch.setattr(bench, "make_rf_fn", skewed)
    rec = bench.run_workload("lstm-b1", _quick_options(), np.random.default_rng(0), have_torch=False, have_ort=False)
    assert rec["oracle"] == "reference"
    mine = rec["results"]["rnnfast:auto"]
    assert mine["status"] == "WRONG"
    assert mine["max_err"] == pytest.approx(0.01, rel=1e-3)
    assert mine["times_s"] == [] and mine["median_ms"] is None
    assert any("WRONG" in line for line in bench.format_rows(rec))


def test_run_workload_not_implemented_is_na(monkeypatch):
    """A feature rnnfast lacks is reported n/a (with the reason) and nothing crashes."""
    def missing(case):
        raise NotImplementedError("not written yet")
    monkeypatch.setattr(bench_cases, "make_rf_layer", missing)
    rec = bench.run_workload("lstm-b1", _quick_options(), np.random.default_rng(0), have_torch=False, have_ort=False)
    for key in ("rnnfast:auto", "reference"):
        r = rec["results"][key]
        assert r["status"] == "n/a" and "not written yet" in r["reason"]
    rows = bench.format_rows(rec)
    assert any("n/a (NotImplementedError: not written yet)" in line for line in rows)


def test_scan_figures(monkeypatch):
    """The bench's linear_scan / minGRU-vs-GRU section (run in-process on small shapes):
    every figure present, positive, and the scan checked against the plain loop."""
    from rnnfast import bench_scan
    monkeypatch.setattr(bench_scan, "SCAN_SHAPE", (4096, 4))
    monkeypatch.setattr(bench_scan, "MIN_SHAPE", (64, 2, 32))
    r = bench_scan.run_scans(2, 1, 1, 0.0)
    for k in ("linear_scan_1thread_s", "linear_scan_threads_s", "linear_scan_speedup", "mingru_s", "gru_s",
              "mingru_vs_gru"):
        assert r[k] > 0, k
    assert r["linear_scan_max_err"] < 1e-4
    lines = bench_scan.format_scans(r)
    assert "linear_scan (4096, 4)" in lines[0] and "minGRU vs rnnfast GRU" in lines[-1]
    try:
        import numba  # noqa: F401
    except ImportError:
        assert "not timed" in lines[1]
    else:
        assert r["plain_loop_s"] > 0 and "plain compiled sequential loop" in lines[1]


def test_bench_accepts_no_scans():
    """--no-scans is accepted and no scan section is printed (a full-table run, without
    --only, prints it after the table; test_scan_figures covers its content)."""
    p = _run("bench", "--quick", "--only", "lstm-b1", "--no-scans", "--no-reference")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "linear_scan" not in p.stdout


def test_roofline_section_measures_both_gemms():
    """The bench's roofline: both GEMMs timed (positive, finite GF/s), the roofline the
    higher one, and a large-batch workload's share computed from its own GF/s."""
    import math

    from rnnfast.bench_roofline import format_roofline, run_roofline
    roof = run_roofline(2, rounds=1, n=256)
    assert roof["numpy_gflops"] > 0 and math.isfinite(roof["numpy_gflops"])
    assert roof["rnnfast_gflops"] > 0 and math.isfinite(roof["rnnfast_gflops"])
    assert roof["roofline_gflops"] == max(roof["numpy_gflops"], roof["rnnfast_gflops"])
    rec = {"name": "lstm-b64", "results": {"rnnfast:auto": {"gflops": roof["roofline_gflops"] / 2}}}
    lines = format_roofline(roof, [rec, {"name": "lstm-b1", "results": {}}])
    assert len(lines) == 2 and "lstm-b64 50%" in lines[1] and "lstm-b1" not in lines[1]


def test_show_config_reports_what_a_bug_report_needs(capsys, monkeypatch):
    """rnnfast.show_config() prints what ``python -m rnnfast info`` prints (version, backends
    and why one is unavailable, ISA level, threads, BLAS, CPU, environment, memory kept);
    mode="dicts" returns it."""
    import rnnfast
    from rnnfast import backends
    monkeypatch.setenv("RNNFAST_TUNE", "0")
    monkeypatch.setitem(backends._broken, "numba-test", "ImportError: no module named numba_test")
    assert rnnfast.show_config() is None
    out = capsys.readouterr().out
    for want in ("rnnfast " + rnnfast.__version__, "backends: available", "numba-test unavailable: ImportError",
                 "isa level:", "threads: rnnfast", "blas:", "cpu:", "environment: ", "RNNFAST_TUNE=0",
                 "memory kept between calls: scratch", "versions: numpy"):
        assert want in out, want
    d = rnnfast.show_config(mode="dicts")
    assert {"rnnfast", "backends", "threads", "cython", "blas", "cpu", "env", "memory", "versions"} <= d.keys()
    assert d["env"]["RNNFAST_TUNE"] == "0" and set(d["memory"]) == {"scratch", "serving", "pool"}
    with pytest.raises(ValueError, match=r"^mode must be 'stdout' or 'dicts', got 'json'"):
        rnnfast.show_config(mode="json")


def test_bench_precision_frozen_rows_and_peers(tmp_path):
    """--precision times frozen layers (checked at the SPEC's bounds) beside ONNX Runtime's
    int8 LSTM (and OpenVINO where installed; n/a with the reason otherwise)."""
    path = tmp_path / "bench.json"
    p = _run("bench", "--quick", "--only", "lstm-b1", "--no-reference", "--precision", "fp32,int8",
             "--json", str(path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "frozen int8" in p.stdout and "x ort8" in p.stdout
    rec = json.loads(path.read_text())["workloads"][0]
    res = rec["results"]
    for prec, tol in (("fp32", 1e-3), ("int8", 2e-2)):
        r = res[f"rnnfast:frozen-{prec}"]
        assert r["status"] == "ok" and r["precision"] == prec, r
        assert r["max_err"] <= tol
    assert res["ort8"]["status"] == "ok", res["ort8"]        # ONNX Runtime is a test extra
    assert res["rnnfast:frozen-int8"]["ratios"]["ort8"] > 0
    for peer in ("ov", "ov16"):
        assert res[peer]["status"] in ("ok", "n/a"), res[peer]
    bad = _run("bench", "--quick", "--only", "lstm-b1", "--precision", "fp16")
    assert bad.returncode == 2 and "unknown precision" in bad.stderr
