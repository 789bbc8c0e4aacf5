"""The time-parallel recurrences' figures of ``python -m rnnfast bench`` (issue #5):

- ``linear_scan`` on (2**17, 4) float32: four features cannot be split across threads,
  so only time chunking can use a second core. Timed on 1 thread and on the bench's
  thread count, against a plain compiled sequential loop (a Numba ``@njit`` loop over
  time, float32 state) on one thread;
- minGRU against rnnfast's own GRU at the mingru-long shape (T=4096, B=4, I=H=256).

Each figure is the median over rounds of the best of a short burst, as in the main table
(short calls repeated back to back inside each timed sample).
"""
from __future__ import annotations

import time

import numpy as np

SCAN_SHAPE = (2 ** 17, 4)
MIN_SHAPE = (4096, 4, 256)


def _best_of(fn, n: int, inner: int) -> float:
    """Best over `n` samples of the mean time of `inner` back-to-back calls."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def _median_rounds(fns: dict, rounds: int, burst: int, pause: float) -> dict:
    """Median over rounds of the best of `burst` samples, the functions interleaved per
    round. A sample repeats a sub-millisecond call back to back for ~20 ms (one call
    right after the pause would mostly time the wake-up of idle threads)."""
    times = {k: [] for k in fns}
    inner = {}
    for k, f in fns.items():
        f()
        t0 = time.perf_counter()
        f()
        inner[k] = max(1, min(1000, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    for _ in range(rounds):
        for k, f in fns.items():
            time.sleep(pause)
            times[k].append(_best_of(f, burst, inner[k]))
    return {k: float(np.median(v)) for k, v in times.items()}


def _plain_loop():
    """A plain compiled sequential scan (Numba), or None when Numba is missing."""
    try:
        from numba import njit
    except Exception:  # noqa: BLE001
        return None

    @njit(cache=False)
    def loop(a, b, out):
        h = np.zeros(a.shape[1], a.dtype)
        for t in range(a.shape[0]):
            for j in range(a.shape[1]):
                h[j] = a[t, j] * h[j] + b[t, j]
                out[t, j] = h[j]
        return out

    return loop


def run_scans(threads: int, rounds: int, burst: int, pause: float) -> dict:
    """Measure the scan figures; returns a dict of times (s) and ratios."""
    import rnnfast as rf
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, SCAN_SHAPE).astype(np.float32)
    b = rng.standard_normal(SCAN_SHAPE).astype(np.float32)
    prev = rf.get_num_threads()

    def scan_on(n):
        def run():
            rf.set_num_threads(n)
            return rf.linear_scan(a, b)
        return run

    fns = {"scan_1": scan_on(1), f"scan_{threads}": scan_on(threads)}
    loop = _plain_loop()
    if loop is not None:
        out = np.empty_like(a)
        fns["plain_loop"] = lambda: loop(a, b, out)
    try:
        t = _median_rounds(fns, rounds, burst, pause)
        want = np.asarray(loop(a, b, np.empty_like(a)) if loop is not None else rf.linear_scan(a, b))
        rf.set_num_threads(threads)
        err = float(np.max(np.abs(rf.linear_scan(a, b) - want)))
        x = rng.standard_normal(MIN_SHAPE).astype(np.float32)
        mg, gru = rf.MinGRU(MIN_SHAPE[2], MIN_SHAPE[2], seed=0), rf.GRU(MIN_SHAPE[2], MIN_SHAPE[2], seed=0)
        tl = _median_rounds({"mingru": lambda: mg(x), "gru": lambda: gru(x)}, max(1, min(rounds, 3)), burst, pause)
    finally:
        rf.set_num_threads(prev)
    res = {"linear_scan_shape": list(SCAN_SHAPE), "threads": threads,
           "linear_scan_1thread_s": t["scan_1"], "linear_scan_threads_s": t[f"scan_{threads}"],
           "linear_scan_speedup": t["scan_1"] / t[f"scan_{threads}"], "linear_scan_max_err": err,
           "min_shape": list(MIN_SHAPE), "mingru_s": tl["mingru"], "gru_s": tl["gru"],
           "mingru_vs_gru": tl["gru"] / tl["mingru"]}
    if "plain_loop" in t:
        res["plain_loop_s"] = t["plain_loop"]
        res["linear_scan_1thread_vs_plain_loop"] = t["plain_loop"] / t["scan_1"]
    return res


def format_scans(r: dict) -> list[str]:
    T, N = r["linear_scan_shape"]
    lines = [f"# linear_scan ({T}, {N}) float32: 1 thread {r['linear_scan_1thread_s'] * 1e3:.3f} ms, "
             f"{r['threads']} threads {r['linear_scan_threads_s'] * 1e3:.3f} ms "
             f"({r['linear_scan_speedup']:.2f}x one thread; max err {r['linear_scan_max_err']:.2g})"]
    if "plain_loop_s" in r:
        lines.append(f"#   plain compiled sequential loop (Numba, 1 thread) {r['plain_loop_s'] * 1e3:.3f} ms: "
                     f"linear_scan on 1 thread is {r['linear_scan_1thread_vs_plain_loop']:.2f}x as fast")
    else:
        lines.append("#   plain compiled loop: not timed (Numba is not installed)")
    T, B, H = r["min_shape"]
    lines.append(f"# minGRU vs rnnfast GRU at ({T}, {B}, {H}), {r['threads']} threads: "
                 f"{r['mingru_s'] * 1e3:.2f} ms vs {r['gru_s'] * 1e3:.2f} ms, {r['mingru_vs_gru']:.2f}x")
    return lines
