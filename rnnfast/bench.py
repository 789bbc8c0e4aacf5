"""``python -m rnnfast bench``: rnnfast against its NumPy reference backend, PyTorch and
ONNX Runtime on the standard workloads of BENCHMARKS.md.

The design is that of the project's referee (``anchor_bench.py``), whose
workload table this module repeats (same names, shapes and FLOP counts):

* Before timing, every library's result is checked against an oracle: PyTorch when it
  is installed, else rnnfast's own "reference" backend (float64 NumPy). Outputs are
  compared; for training also dx and every weight gradient; errors are relative to the
  oracle's scale where it exceeds 1 (:func:`max_err`). A result off by more than
  :data:`TOLERANCE` is reported as ``WRONG`` and not timed.
* Every library is warmed up (JIT compiles, caches), then each round times every
  library as the best of a short burst of calls, after a pause that lets the previous
  library's idle threads stop spinning. Figures are medians over rounds; a ratio is
  the median of the per-round ratios (> 1: rnnfast is faster). GF/s counts useful work
  only (no padded steps).
* To keep a default run within about 10 minutes on 2 cores, a workload whose rounds
  would take longer than :data:`ROUND_CAP_S` (estimated from the warm-up calls) gets
  fewer rounds, :data:`MIN_ROUNDS` at least; an explicit ``--rounds`` is obeyed exactly.
* The reference backend is slow on the large workloads: when ``rounds x burst`` of its
  calls would take longer than :data:`REFERENCE_BUDGET_S` it is timed by one call only
  (ratio = that time over rnnfast's median; a call of over :data:`REUSE_CHECK_CALL_S` is
  the one already made for the correctness check), and ``--no-reference`` leaves it out.
* Features that rnnfast does not have yet (training, minGRU, a backend whose kernels
  are missing) are reported as ``n/a (reason)``; the run goes on.

PyTorch, ONNX Runtime (with ``onnx``) and matplotlib are optional and imported only here,
lazily; rnnfast itself never needs them.

Exit status: 0, or 1 when a rnnfast result was wrong or a rnnfast call failed (a
feature reported n/a is not a failure).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import threads
from .bench_cases import (
    LOWP_PEERS,
    PEER_TOLERANCE,
    TOLERANCE,
    WORKLOADS,
    Case,
    _short,
    build_case,
    check_result,
    make_lowp_peer_fn,
    make_ort_fn,
    make_rf_fn,
    make_torch_fn,
    na_reason,
    ort_supports,
)
from .bench_roofline import ROOFLINE_N, ROOFLINE_WORKLOADS, format_roofline, run_roofline

REFERENCE_BUDGET_S = 3.0    # reference timed every round only if that costs less than this
REUSE_CHECK_CALL_S = 1.0    # a reference timed once reuses its checked call when that took longer
ROUND_CAP_S = 20.0          # default rounds are cut (to MIN_ROUNDS at least) past this per workload
MIN_ROUNDS = 3
PEERS = ("reference", "torch", "ort", *LOWP_PEERS)
# max error of a frozen layer against the oracle (SPEC Part 2: bf16 <= 1e-2, int8 <= 2e-2)
PRECISION_TOLERANCE = {"bf16": 1e-2, "int8": 2e-2}
PEER_TITLES = {"reference": "ref", "torch": "torch", "ort": "ort", "ort8": "ort int8", "ov": "openvino f32",
               "ov16": "openvino default (bf16)"}


# ----------------------------------------------------------------------------- timing
@dataclass
class Entry:
    """One library (or one rnnfast backend) on one workload."""

    key: str            # "rnnfast:<backend>", "reference", "torch", "ort"
    label: str
    fn: Callable | None = None
    status: str = "ok"  # ok | n/a | failed | WRONG | skipped | unavailable
    reason: str = ""
    err: float = float("nan")
    policy: str = "rounds"      # rounds | once
    first_call_s: float = float("nan")
    times: list = field(default_factory=list)

    @property
    def timed(self) -> bool:
        return self.status == "ok" and bool(self.times)

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")


def _burst(fn, n: int) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ratio(peer: Entry, mine: Entry) -> float:
    """Median of per-round ratios peer/mine (> 1: `mine` is faster); an entry timed once
    is compared with the other's median."""
    if not (peer.timed and mine.timed):
        return float("nan")
    if len(peer.times) == len(mine.times):
        return float(np.median(np.asarray(peer.times) / np.asarray(mine.times)))
    return peer.median / mine.median


@dataclass
class Options:
    names: list
    rounds: int = 7
    threads: int = 2
    backends: list = field(default_factory=lambda: ["auto"])
    reference: bool = True
    burst: int = 3
    warmup: int = 2
    pause: float = 0.25
    quick: bool = False
    round_cap_s: float | None = ROUND_CAP_S   # None: exactly `rounds` rounds
    precisions: list = field(default_factory=list)   # frozen layers timed too (--precision)


def _peer_versions() -> dict:
    from importlib import metadata
    out = {}
    for mod in ("torch", "onnxruntime", "onnx", "numpy", "scipy", "numba"):
        try:
            out[mod] = metadata.version(mod)
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def _resolved(backend_name: str, case: Case) -> str:
    """What "auto" dispatches to for this workload (for the label only)."""
    if backend_name != "auto":
        return backend_name
    try:
        import rnnfast as rf
        from rnnfast import backends as _b
        with rf.backend("auto"):
            return _b.resolve(case.kind, case.B, case.H, np.dtype(np.float32), rf.get_num_threads())
    except Exception:  # noqa: BLE001
        return "?"


def run_workload(name: str, opt: Options, rng: np.random.Generator, have_torch: bool, have_ort: bool) -> dict:
    """Check and time every library on one workload; returns the workload's record."""
    import rnnfast as rf
    case = build_case(name, rng, have_torch)
    entries: dict[str, Entry] = {}
    avail = rf.available_backends()
    for b in opt.backends:
        lab = b if b != "auto" else f"auto:{_resolved(b, case)}"
        e = Entry(f"rnnfast:{b}", lab)
        if b != "auto" and b not in avail:
            e.status, e.reason = "n/a", f"backend {b!r} not available (available: {avail})"
        else:
            try:
                e.fn = make_rf_fn(case, b)
            except Exception as ex:  # noqa: BLE001
                na = na_reason(ex)
                e.status, e.reason = ("n/a", na) if na else ("failed", f"{type(ex).__name__}: {ex}")
        entries[e.key] = e
    for prec in opt.precisions:          # frozen layers (layer.freeze(prec)), beside the backends
        e = Entry(f"rnnfast:frozen-{prec}", f"frozen {prec}")
        try:
            e.fn = make_rf_fn(case, "auto", precision=prec)
        except Exception as ex:  # noqa: BLE001
            na = na_reason(ex)
            e.status, e.reason = ("n/a", na) if na else ("failed", f"{type(ex).__name__}: {ex}")
        entries[e.key] = e
    # the reference backend (a peer, and the oracle when PyTorch is missing)
    ref = Entry("reference", "reference")
    try:
        ref.fn = make_rf_fn(case, "reference")
    except Exception as ex:  # noqa: BLE001
        na = na_reason(ex)
        ref.status, ref.reason = ("n/a", na) if na else ("failed", f"{type(ex).__name__}: {ex}")
    entries["reference"] = ref
    if have_torch:
        t = Entry("torch", "torch")
        try:
            t.fn = make_torch_fn(case)
        except Exception as ex:  # noqa: BLE001
            t.status, t.reason = "failed", f"{type(ex).__name__}: {ex}"
        entries["torch"] = t
    if opt.precisions and ort_supports(case):      # the frozen layers' peers
        for peer in LOWP_PEERS:
            pe = Entry(peer, peer)
            try:
                if case.sd is None:
                    raise RuntimeError("no weights (rnnfast layer could not be built)")
                pe.fn = make_lowp_peer_fn(case, peer, opt.threads)
            except Exception as ex:  # noqa: BLE001
                na = na_reason(ex)
                pe.status, pe.reason = ("n/a", na) if na else ("failed", f"{type(ex).__name__}: {ex}")
            entries[peer] = pe
    if have_ort and ort_supports(case):
        o = Entry("ort", "ort")
        try:
            if case.sd is None:
                raise RuntimeError("no weights (rnnfast layer could not be built)")
            o.fn = make_ort_fn(case, opt.threads)
        except Exception as ex:  # noqa: BLE001
            o.status, o.reason = "failed", f"{type(ex).__name__}: {ex}"
        entries["ort"] = o

    # oracle: PyTorch, else the reference backend
    want, oracle = None, None
    for k in ("torch", "reference"):
        e = entries.get(k)
        if e is None or e.status != "ok":
            continue
        try:
            t0 = time.perf_counter()
            want = e.fn()
            e.first_call_s = time.perf_counter() - t0
            oracle = k
            break
        except Exception as ex:  # noqa: BLE001
            na = na_reason(ex) if k == "reference" else None
            e.status, e.reason = ("n/a", na) if na else ("failed", f"{type(ex).__name__}: {ex}")
    for k, e in entries.items():
        if k == oracle or e.status != "ok":
            continue
        try:
            t0 = time.perf_counter()
            got = e.fn()
            e.first_call_s = time.perf_counter() - t0
        except Exception as ex:  # noqa: BLE001
            na = na_reason(ex)
            e.status, e.reason = ("n/a", na) if na else ("failed", f"{type(ex).__name__}: {ex}")
            continue
        if want is None:
            e.reason = "unchecked (no oracle)"
            continue
        prec = k.rsplit("frozen-", 1)[1] if "frozen-" in k else None
        tol = PRECISION_TOLERANCE.get(prec, PEER_TOLERANCE.get(k, TOLERANCE))
        ok, err, msg = check_result(got, want, tol)
        e.err = err
        if not ok:
            e.status, e.reason = "WRONG", msg
    if oracle is not None:
        entries[oracle].err = 0.0

    if not opt.reference and ref.status == "ok":
        ref.status, ref.reason = "skipped", "--no-reference"
    if ref.status == "ok":
        est = ref.first_call_s
        if opt.quick or not (est * opt.burst * opt.rounds <= REFERENCE_BUDGET_S):
            ref.policy = "once"
    live = [e for e in entries.values() if e.status == "ok"]
    per_round = 0.0                      # estimated cost of one round, from the last warm-up calls
    for e in live:                       # warm-up (JIT compiles, caches)
        if e.key == "reference":
            if e.policy == "rounds":
                per_round += opt.pause + e.first_call_s * opt.burst
            continue
        last = e.first_call_s
        for _ in range(opt.warmup):
            t0 = time.perf_counter()
            e.fn()
            last = time.perf_counter() - t0
        per_round += opt.pause + last * opt.burst
    rounds = opt.rounds
    if opt.round_cap_s is not None and per_round * rounds > opt.round_cap_s:
        rounds = max(min(rounds, MIN_ROUNDS), int(opt.round_cap_s // per_round))
    for r in range(rounds):
        for e in live:
            if e.policy == "once":
                if r:
                    continue
                if e.first_call_s >= REUSE_CHECK_CALL_S:   # its checked call: a second is a waste
                    e.times.append(e.first_call_s)
                    continue
                time.sleep(opt.pause)
                e.times.append(_burst(e.fn, 1))
                continue
            time.sleep(opt.pause)
            e.times.append(_burst(e.fn, opt.burst))

    rec = {
        "name": name, "kind": case.kind, "T": case.T, "B": case.B, "I": case.I, "H": case.H,
        "extra": dict(case.ex), "flops": case.work, "oracle": oracle, "rounds": rounds,
        "lowp_peers": bool(opt.precisions),
        "rounds_requested": opt.rounds, "results": {},
    }
    peers = [entries[k] for k in PEERS if k in entries]
    for e in entries.values():
        r = {"label": e.label, "status": e.status, "reason": e.reason,
             "max_err": None if math.isnan(e.err) else e.err,
             "times_s": list(e.times), "median_ms": e.median * 1e3 if e.timed else None,
             "gflops": case.work / e.median / 1e9 if e.timed else None,
             "first_call_ms": None if math.isnan(e.first_call_s) else e.first_call_s * 1e3}
        if e.key == "reference":
            r["policy"] = e.policy
        if e.key.startswith("rnnfast:"):
            r["backend"] = e.key.split(":", 1)[1]
            if "frozen-" in e.key:
                r["precision"] = e.key.rsplit("frozen-", 1)[1]
            r["resolved"] = e.label.split(":", 1)[-1]
            rat = {p.key: ratio(p, e) for p in peers}
            r["ratios"] = {k: (None if math.isnan(v) else v) for k, v in rat.items()}
        rec["results"][e.key] = r
    return rec


# ----------------------------------------------------------------------------- output
def _fmt_ms(r: dict | None) -> str:
    if r is None or r["median_ms"] is None:
        return "-"
    v = r["median_ms"]
    return f"{v:.0f}" if v >= 1000 else f"{v:.2f}"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


HEADER = (f"{'workload':15s} {'backend':13s} {'rnnfast ms':>10s} {'ref ms':>8s} {'torch ms':>9s} {'ort ms':>8s} "
          f"{'GF/s':>6s} {'x ref':>7s} {'x torch':>8s} {'x ort':>7s} {'max err':>8s}")


def format_rows(rec: dict) -> list[str]:
    """Table rows (and notes) of one workload record."""
    res = rec["results"]
    lines, notes = [], []
    for k, r in res.items():
        if not k.startswith("rnnfast:"):
            continue
        gf = "-" if r["gflops"] is None else f"{r['gflops']:.1f}"
        err = "-" if r["max_err"] is None else f"{r['max_err']:.2g}"
        ms = _fmt_ms(r) if r["status"] == "ok" else ("n/a" if r["status"] == "n/a" else r["status"])
        rat = r["ratios"]
        line = (f"{rec['name']:15s} {r['label']:13s} {ms:>10s} {_fmt_ms(res.get('reference')):>8s} "
                f"{_fmt_ms(res.get('torch')):>9s} {_fmt_ms(res.get('ort')):>8s} {gf:>6s} "
                f"{_fmt_x(rat.get('reference')):>7s} {_fmt_x(rat.get('torch')):>8s} "
                f"{_fmt_x(rat.get('ort')):>7s} {err:>8s}")
        if rec.get("lowp_peers"):
            line += "".join(f" {_fmt_ms(res.get(p)):>8s} {_fmt_x(rat.get(p)):>7s}" for p in LOWP_PEERS)
        lines.append(line)
    grouped: dict[str, list] = {}          # one note per distinct reason
    for k, r in res.items():
        who = r["label"] if k.startswith("rnnfast:") else k
        if r["status"] == "skipped":        # --no-reference: said once in the header
            continue
        if r["status"] != "ok":
            why = "n/a" if r["status"] == "n/a" else r["status"]
            grouped.setdefault(f"{why} ({_short(r['reason'])})", []).append(who)
        elif k == "reference" and r.get("policy") == "once" and r["median_ms"] is not None:
            notes.append("ref ms from one call (slow)")
        elif r["reason"]:
            grouped.setdefault(r["reason"], []).append(who)
    notes = [f"{', '.join(w)}: {why}" for why, w in grouped.items()] + notes
    if rec.get("rounds", 0) < rec.get("rounds_requested", 0):
        notes.append(f"{rec['rounds']} rounds (time cap)")
    if rec["oracle"] and rec["oracle"] != "torch":
        notes.append(f"checked against {rec['oracle']}")
    if notes:
        lines.append(" " * 16 + "# " + "; ".join(notes))
    return lines


def plot_png(records: list[dict], path: str) -> str | None:
    """Bar chart of rnnfast's speedups vs each peer per workload; returns an error
    message instead of raising when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"--png needs matplotlib (pip install matplotlib): {e}"
    series: dict[str, list] = {}
    names = [r["name"] for r in records]
    for i, rec in enumerate(records):
        for k, r in rec["results"].items():
            if not k.startswith("rnnfast:"):
                continue
            for peer, v in r["ratios"].items():
                s = series.setdefault(f"{r['backend']} vs {PEER_TITLES.get(peer, peer)}", [float("nan")] * len(names))
                s[i] = float("nan") if v is None else v
    series = {k: v for k, v in series.items() if not all(math.isnan(x) for x in v)}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(names) + 3), 5))
    n = max(1, len(series))
    width = 0.8 / n
    xs = np.arange(len(names))
    for j, (lab, vals) in enumerate(series.items()):
        ax.bar(xs + (j - (n - 1) / 2) * width, [0 if math.isnan(v) else v for v in vals], width, label=lab)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("speedup of rnnfast (> 1: rnnfast faster)")
    ax.set_title("rnnfast speedups (median of per-round ratios)")
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- entry
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--only", default="", help="comma-separated workload names (default: all)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"timing rounds (default 7, fewer (>= {MIN_ROUNDS}) for a workload whose rounds would take "
                         f"over {ROUND_CAP_S:.0f} s; 1 with --quick); given explicitly, exactly that many")
    ap.add_argument("--threads", type=int, default=2, help="threads for every library (default 2)")
    ap.add_argument("--backends", default="auto",
                    help='comma-separated rnnfast backends timed side by side (default "auto")')
    ap.add_argument("--precision", default="",
                    help="also time frozen layers, comma-separated: fp32,bf16,int8 (layer.freeze(...); "
                         "inference and stream workloads)")
    ap.add_argument("--no-reference", action="store_true", help="do not time the (slow) NumPy reference backend")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, bursts of 1, short pauses")
    ap.add_argument("--json", metavar="PATH", help="write every figure to PATH (JSON)")
    ap.add_argument("--png", metavar="PATH", help="bar chart of speedups per workload (needs matplotlib)")
    ap.add_argument("--no-scans", action="store_true",
                    help="skip the linear_scan / minGRU-vs-GRU figures after the table (also skipped with --only)")


def run(args: argparse.Namespace) -> int:
    import rnnfast as rf
    t_start = time.perf_counter()
    names = list(WORKLOADS)
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in want if n not in WORKLOADS]
        if bad:
            print(f"rnnfast bench: unknown workload(s) {bad}; known: {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
        names = [n for n in WORKLOADS if n in want]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] or ["auto"]
    bad = [b for b in backends if b not in ("auto", "cython", "numba", "reference")]
    if bad:
        print(f"rnnfast bench: unknown backend(s) {bad}; expected auto, cython, numba, reference", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in getattr(args, "precision", "").split(",") if p.strip()]
    badp = [p for p in precisions if p not in ("fp32", "fp64", "bf16", "int8")]
    if badp:
        print(f"rnnfast bench: unknown precision(s) {badp}; expected fp32, fp64, bf16, int8", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("rnnfast bench: --threads must be >= 1", file=sys.stderr)
        return 2
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 7)
    if rounds < 1:
        print("rnnfast bench: --rounds must be >= 1", file=sys.stderr)
        return 2
    opt = Options(names=names, rounds=rounds, threads=args.threads, backends=backends,
                  reference=not args.no_reference, quick=args.quick, precisions=precisions)
    if args.quick:
        opt.burst, opt.warmup, opt.pause = 1, 1, 0.05
    if args.rounds is not None or args.quick:
        opt.round_cap_s = None

    rf.set_num_threads(opt.threads)
    have_torch = have_ort = False
    notes = []
    try:
        import torch
        torch.set_num_threads(opt.threads)
        have_torch = True
    except Exception as e:  # noqa: BLE001
        notes.append(f"PyTorch not available ({type(e).__name__}: {e}); checked against the reference backend")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        have_ort = True
    except Exception as e:  # noqa: BLE001
        notes.append(f"ONNX Runtime not available ({type(e).__name__}: {e})")
    vers = _peer_versions()
    meta = {
        "rnnfast": rf.__version__, "threads": opt.threads, "rounds": opt.rounds, "burst": opt.burst,
        "pause_s": opt.pause, "quick": opt.quick, "backends": backends, "reference": opt.reference,
        "reference_budget_s": REFERENCE_BUDGET_S, "tolerance": TOLERANCE,
        "available_backends": rf.available_backends(),
        "torch": vers["torch"] if have_torch else None, "onnxruntime": vers["onnxruntime"] if have_ort else None,
        "numpy": vers["numpy"], "scipy": vers["scipy"], "numba": vers["numba"],
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": _cpu_model(), "argv": sys.argv, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"# rnnfast {rf.__version__}  threads={opt.threads} rounds={opt.rounds} burst={opt.burst} "
          f"backends={','.join(backends)}  torch={meta['torch'] or '-'} onnxruntime={meta['onnxruntime'] or '-'}"
          f"  reference={'timed' if opt.reference else 'skipped'}")
    meta["host"] = _host()
    print(f"# {meta['cpu']}; ratios > 1: rnnfast faster (median of per-round ratios); "
          f"max err vs {'torch' if have_torch else 'reference'}")
    print(f"# host: {meta['host']['line']}")
    for n in notes:
        print(f"# {n}")
    print(HEADER + ("".join(f" {p + ' ms':>8s} {'x ' + p:>7s}" for p in LOWP_PEERS) if opt.precisions else ""))
    sys.stdout.flush()
    rng = np.random.default_rng(0)
    records, status = [], 0
    out = {"meta": meta, "workloads": records}
    for name in names:
        try:
            rec = run_workload(name, opt, rng, have_torch, have_ort)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one workload must not end the run
            rec = {"name": name, "kind": WORKLOADS[name][0], "error": f"{type(e).__name__}: {e}", "results": {}}
            print(f"{name:15s} error: {_short(rec['error'])}")
            status = 1
        else:
            for line in format_rows(rec):
                print(line)
            for k, r in rec["results"].items():
                if k.startswith("rnnfast:") and r["status"] in ("WRONG", "failed"):
                    status = 1
        records.append(rec)
        sys.stdout.flush()
        if args.json:
            out["meta"]["wall_s"] = time.perf_counter() - t_start
            _write_json(args.json, out)
    if any(n in ROOFLINE_WORKLOADS for n in names):
        try:
            out["roofline"] = run_roofline(opt.threads, rounds=1 if opt.quick else 5,
                                           n=512 if opt.quick else ROOFLINE_N)
        except Exception as e:  # noqa: BLE001 - report, keep the table
            out["roofline"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"# roofline: error: {_short(out['roofline']['error'])}")
            status = 1
        else:
            for line in format_roofline(out["roofline"], records):
                print(line)
    if not args.only and not getattr(args, "no_scans", False):
        from .bench_scan import format_scans, run_scans
        try:
            out["scans"] = run_scans(opt.threads, max(1, min(opt.rounds, 5)), opt.burst, opt.pause)
        except Exception as e:  # noqa: BLE001 - report, keep the table
            out["scans"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"# scans: error: {_short(out['scans']['error'])}")
            status = 1
        else:
            for line in format_scans(out["scans"]):
                print(line)
    wall = time.perf_counter() - t_start
    out["meta"]["wall_s"] = wall
    if args.json:
        _write_json(args.json, out)
        print(f"# figures written to {args.json}")
    if args.png:
        msg = plot_png([r for r in records if "error" not in r], args.png)
        if msg:
            print(f"# {msg}", file=sys.stderr)
            status = status or 1
        else:
            print(f"# chart written to {args.png}")
    print(f"# wall time {wall:.1f} s")
    return status


def _write_json(path: str, obj: dict) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(clean(obj), fh, indent=1)
    os.replace(tmp, path)


def _host() -> dict:
    """What the figures ran on: the kernels' ISA level, what gcc -march=native takes the CPU
    for, NumPy's BLAS kernel, and the environment variables that pin it."""
    from .bench_roofline import PIN_VARS
    from .info import compiler_native_target, isa_info
    out: dict = {}
    try:
        isa = isa_info()
        out["isa"] = isa.get("level") or "?"
        out["isa_reason"] = isa.get("reason")
    except Exception as e:  # noqa: BLE001
        out["isa"] = f"? ({type(e).__name__})"
    out["native_target"] = compiler_native_target()
    try:
        libs = threads.blas_info()
        out["blas"] = ", ".join(dict.fromkeys(f"{lib.get('internal_api')} {lib.get('version')} "
                                              f"{lib.get('architecture') or ''}".strip() for lib in libs)) or "?"
    except Exception as e:  # noqa: BLE001
        out["blas"] = f"? ({type(e).__name__})"
    out["pinned_by"] = {v: os.environ[v] for v in PIN_VARS if v in os.environ}
    pins = " ".join(f"{k}={v}" for k, v in out["pinned_by"].items())
    out["line"] = (f"kernels {out['isa']} ({out.get('isa_reason')}); gcc -march=native: "
                   f"{out['native_target'] or '-'}; NumPy BLAS {out['blas']}"
                   + (f" (pinned by {pins} in this environment)" if pins else ""))
    return out


def _cpu_model() -> str:
    try:
        from .info import cpu_info
        c = cpu_info()
        return f"{c.get('model') or platform.processor() or platform.machine()}, {c.get('logical_cpus')} CPUs"
    except Exception:  # noqa: BLE001
        return platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rnnfast bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
