"""Host-measured choices of the Cython kernel's step forms, made once per machine.

Two step forms won on one host and lost on another (figures in docs/performance.md):
threads splitting a step's batch rows instead of its hidden units (won at 8 rows on a
2 MB-L2 Xeon, lost on every shape on a 1 MB-L2 Zen 5; commit 48267e2), and the
recurrent product of one or two live rows straight from the row-major weights
(``rf_rowdot``; won at 2 rows on the Xeon, lost on the Zen 5, whose L2 streams the
packed panels faster; commits 14c9399 and 9274a3e).
Instead of a constant tuned on one CPU, :func:`profile` measures both on the user's
machine the first time a layer needs them: alternating calls of each form on an
LSTM(256) of 100 steps at 8 and 2 rows (about 0.3 s on two cores, once), kept in the
user's cache directory per machine, build and thread count
(``$XDG_CACHE_HOME/rnnfast/tune.json``, else ``~/.cache/rnnfast``), so that later
processes take the same choice without measuring. ``python -m rnnfast tune`` measures
again; ``RNNFAST_TUNE=0`` turns measuring off (the defaults below, the forms off).

A training GEMM measured alone is not a fair candidate: NumPy's OpenBLAS matched
rnnfast's GEMM on a 2048^3 product on the Xeon but made training steps slower in place
(its threads spin between the OpenMP regions), so the GEMMs are not chosen here (figures
in docs/performance.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time

import numpy as np

# The profile when tuning is off, and the values a measured win turns on: one place.
DEFAULTS = {"bsplit_max_wbytes": 0, "rec_rowdot_rows": 0}
ON_VALUES = {"bsplit_max_wbytes": 1280 << 10, "rec_rowdot_rows": 2}
# How each form is measured on an LSTM(256) of 100 steps: (label of its time ratio, batch
# rows, fewest threads it applies to). The batch split: 8 rows (1 MB of recurrent weights
# each thread reads); the row-dot recurrence: 2 live rows.
FORMS = {"bsplit_max_wbytes": ("bsplit_time_ratio", 8, 2), "rec_rowdot_rows": ("rowdot_time_ratio", 2, 1)}
MIN_GAIN = 0.04         # a form is taken when its median time is at least 4 % lower (noise: 1-3 %)
ROUNDS = 5

_lock = threading.Lock()
_profiles: dict[int, dict] = {}
_forced = threading.local()     # the forms a measurement runs with, on its own thread


def enabled() -> bool:
    return os.environ.get("RNNFAST_TUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rnnfast", "tune.json")


def machine_key(nthreads: int) -> str:
    """What a profile holds for: CPU model and features, kernel level, version, threads."""
    from . import __version__
    from .info import cpu_info
    from .kernels import _isa
    cpu = cpu_info()
    try:
        level = _isa.choose()[0]
    except RuntimeError:
        level = "?"
    text = json.dumps([cpu.get("model"), sorted(cpu.get("simd") or []), platform.machine(), level,
                       __version__, int(nthreads)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load() -> dict:
    try:
        with open(cache_path()) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(key: str, prof: dict) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _load()
        data[key] = prof
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass                    # a read-only home: the profile lives for this process only


def forced() -> dict | None:
    """The forms a measurement on this thread runs with, or None."""
    return getattr(_forced, "forms", None)


def _time_pair(call, forms_a: dict, forms_b: dict, rounds: int) -> float:
    """Median over rounds of time(b) / time(a), each the best of two calls, alternating."""
    ratios = []
    for r in range(rounds):
        t = {}
        for name, forms in (("a", forms_a), ("b", forms_b)) if r % 2 == 0 else (("b", forms_b), ("a", forms_a)):
            _forced.forms = forms
            try:
                best = float("inf")
                for _ in range(2):
                    t0 = time.perf_counter()
                    call()
                    best = min(best, time.perf_counter() - t0)
            finally:
                _forced.forms = dict(DEFAULTS)
            t[name] = best
        ratios.append(t["b"] / t["a"])
    return float(np.median(ratios))


def measure(nthreads: int, rounds: int = ROUNDS) -> dict:
    """Measure both step forms on this machine: a profile. The calls run at rnnfast's
    thread count, ``nthreads`` (the caller's setting)."""
    import rnnfast
    prof = dict(DEFAULTS)
    measured = {}
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    _forced.forms = dict(DEFAULTS)      # the warm-up calls too: no profile lookup inside
    try:
        with rnnfast.backend("cython"):
            for form, (label, rows, min_threads) in FORMS.items():
                if nthreads < min_threads:
                    continue
                layer = rnnfast.LSTM(256, 256, seed=0)
                x = rng.standard_normal((100, rows, 256)).astype(np.float32)
                layer(x)
                ratio = _time_pair(lambda layer=layer, x=x: layer(x), dict(DEFAULTS),
                                   {**DEFAULTS, form: ON_VALUES[form]}, rounds)
                measured[label] = ratio
                if ratio < 1.0 - MIN_GAIN:
                    prof[form] = ON_VALUES[form]
    finally:
        _forced.forms = None
    prof["measured"] = measured
    prof["threads"] = int(nthreads)
    prof["seconds"] = round(time.perf_counter() - t0, 3)
    prof["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return prof


def profile(nthreads: int) -> dict:
    """The step-form profile for ``nthreads`` threads: measured once per machine, build and
    thread count (then read from the cache), or DEFAULTS with RNNFAST_TUNE=0."""
    f = forced()
    if f is not None:
        return f
    p = _profiles.get(nthreads)
    if p is not None:
        return p
    if not enabled():
        return DEFAULTS
    with _lock:
        p = _profiles.get(nthreads)
        if p is None:
            key = machine_key(nthreads)
            p = _load().get(key)
            if not (isinstance(p, dict) and all(k in p for k in DEFAULTS)):
                p = measure(nthreads)
                p["source"] = "measured"
                _save(key, p)
            _profiles[nthreads] = p
    return p


def retune(nthreads: int) -> dict:
    """Measure again (``python -m rnnfast tune``) and replace the cached profile."""
    p = measure(nthreads)
    p["source"] = "measured"
    with _lock:
        _save(machine_key(nthreads), p)
        _profiles[nthreads] = p
    return p
