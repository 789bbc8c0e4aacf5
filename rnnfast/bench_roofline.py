"""The GEMM roofline section of ``python -m rnnfast bench``: a square float32 product on
the bench's threads by NumPy's BLAS and by rnnfast's own GEMM (``kernels/rf_gemm.h``,
the training GEMMs), and each large-batch workload's GF/s as a share of the faster.

BENCHMARKS.md states the roofline as NumPy's OpenBLAS on 2048-3072 squares; the BLAS
that NumPy ships may run below the CPU's vector width (``OPENBLAS_CORETYPE`` pinned to an
older core), so both are measured in the same run and the higher one is the roofline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from . import threads

# Set on some hosts to keep old OpenBLAS builds working; they pin a current OpenBLAS to
# older kernels. Users' machines do not set them, so the roofline's NumPy figure is taken
# in a child process without them (this process's environment is left as it is).
PIN_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_CHILD = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
n, nt, rounds = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(1)
a = rng.standard_normal((n, n)).astype(np.float32); b = rng.standard_normal((n, n)).astype(np.float32)
c = np.empty((n, n), np.float32)
with threadpool_limits(limits=nt, user_api="blas"):
    np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter(); np.matmul(a, b, out=c); best = min(best, time.perf_counter() - t)
arch = [i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas" and i.get("architecture")]
print(json.dumps({"gflops": 2.0 * n ** 3 / best / 1e9, "arch": arch[0] if arch else None}))
"""


def numpy_unpinned(n: int, nthreads: int, rounds: int) -> dict | None:
    """NumPy's BLAS GF/s in a child process with PIN_VARS unset; None if none is set."""
    if not any(v in os.environ for v in PIN_VARS):
        return None
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(nthreads), str(rounds)], env=env,
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])

ROOFLINE_N = 2048
ROOFLINE_WORKLOADS = ("lstm-b64", "gru-b64", "rnn-b64", "lstm-2l-bidir", "lstm-train-b64", "gru-train-b64")


def _best_gflops(fn, n: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def run_roofline(nthreads: int, rounds: int = 5, n: int = ROOFLINE_N) -> dict:
    """GF/s of an n x n x n float32 product: NumPy's BLAS and rnnfast's GEMM."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), np.float32)
    out = {"n": n, "threads": nthreads}
    with threads.blas_threads(nthreads):
        out["numpy_gflops"] = _best_gflops(lambda: np.matmul(a, b, out=c), n, rounds)
        arch = [lib.get("architecture") for lib in threads.blas_info() if lib.get("architecture")]
        libs = dict.fromkeys(f"{lib.get('internal_api')} {lib.get('architecture') or ''}".strip()
                             for lib in threads.blas_info())
        out["numpy_blas"] = ", ".join(libs) or "unknown"
        out["numpy_arch"] = arch[0] if arch else None
    try:
        from .kernels import cy_train
    except ImportError:
        out["rnnfast_gflops"] = None
    else:
        with threads.blas_threads(1):       # pgemm's OpenMP threads each call BLAS
            out["rnnfast_gflops"] = _best_gflops(lambda: cy_train.pgemm(a, b, c, 0.0, nthreads), n, rounds)
    out["pinned_by"] = {v: os.environ[v] for v in PIN_VARS if v in os.environ}
    un = numpy_unpinned(n, nthreads, rounds)
    out["numpy_unpinned"] = un
    cands = [out["numpy_gflops"], out["rnnfast_gflops"]]
    if un and "gflops" in un:
        cands.append(un["gflops"])
    out["roofline_gflops"] = max(v for v in cands if v is not None)
    return out


def format_roofline(roof: dict, records: list) -> list[str]:
    """Lines for the bench output: the two GEMMs, then each large workload's share."""
    lines = [f"# GEMM roofline ({roof['n']}^3 float32, {roof['threads']} threads): NumPy's BLAS "
             f"({roof['numpy_blas']}) {roof['numpy_gflops']:.0f} GF/s"
             + ("" if roof["rnnfast_gflops"] is None else f", rnnfast's GEMM {roof['rnnfast_gflops']:.0f} GF/s")]
    un = roof.get("numpy_unpinned")
    if un is not None:
        pins = " ".join(f"{k}={v}" for k, v in roof.get("pinned_by", {}).items())
        lines.append(f"#   this environment sets {pins}, which pins NumPy's OpenBLAS; unset for this "
                     "measurement alone: "
                     + (f"{un['gflops']:.0f} GF/s ({un.get('arch') or '?'} kernels)" if "gflops" in un
                        else f"error {un.get('error')}"))
    shares = []
    for rec in records:
        if rec.get("name") not in ROOFLINE_WORKLOADS:
            continue
        for key, r in rec.get("results", {}).items():
            if key.startswith("rnnfast:") and r.get("gflops"):
                shares.append(f"{rec['name']} {100.0 * r['gflops'] / roof['roofline_gflops']:.0f}%")
                break
    if shares:
        lines.append(f"#   share of the higher ({roof['roofline_gflops']:.0f} GF/s): " + ", ".join(shares))
    return lines
