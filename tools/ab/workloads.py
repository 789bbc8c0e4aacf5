"""Time named workloads in this process: prints name=ms (median of 7 best-of-3 calls).

Used for A/B comparisons of two builds in alternating processes (see ab.sh):
    PYTHONPATH=/path/to/old/tree python tools/ab/workloads.py lstm-b8,bidir
    python tools/ab/workloads.py --list

One table of workloads: the standard workloads are ``rnnfast.bench_cases.WORKLOADS``
(those of ``python -m rnnfast bench`` and of the asv suite), built and called as there
(``build_case``, ``make_rf_fn``, backend "auto", 2 threads). The table and its builders
are read from *this* tree's rnnfast/bench_cases.py, whichever rnnfast is imported, so
the old and the new tree run the same calls (through rnnfast's public API only). EXTRA
adds the A/B-only shapes, in the same (kind, T, B, I, H, extra) form, and ALIASES keeps
the short names of earlier A/B notes.
"""
import importlib.util
import os
import sys
import time

import numpy as np

import rnnfast

_src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "rnnfast", "bench_cases.py")
_spec = importlib.util.spec_from_file_location("_ab_bench_cases", _src)
bench_cases = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench_cases       # dataclasses look their module up by name
_spec.loader.exec_module(bench_cases)

# A/B-only shapes. Extra keys beyond bench_cases': "layer" (options of the layer's
# constructor, e.g. the GRU without linear_before_reset) and "threads" (default 2).
NOLBR = {"layer": {"linear_before_reset": False}}
EXTRA = {
    "grun-b8":   ("gru", 100, 8, 256, 256, NOLBR),
    "grun-b64":  ("gru", 100, 64, 512, 512, NOLBR),
    "gru-b8":    ("gru", 100, 8, 256, 256, {}),
    "gru-b7":    ("gru", 100, 7, 256, 256, {}),
    "gru512-b8": ("gru", 100, 8, 512, 512, {}),
    "lstm512-b8": ("lstm", 100, 8, 512, 512, {}),
    "rnn-b8":    ("rnn", 100, 8, 512, 512, {}),
    "lstm-b7":   ("lstm", 100, 7, 256, 256, {}),
    "bidir1":    ("lstm", 500, 16, 256, 256, {"bidirectional": True}),
    "uni16":     ("lstm", 500, 16, 256, 256, {}),
    "uni16l1":   ("lstm", 500, 16, 256, 256, {"threads": 1}),
}
ALIASES = {
    "bidir": "lstm-2l-bidir",
    "train-b8": "lstm-train-b8",
    "train-b64": "lstm-train-b64",
    "gtrain-b64": "gru-train-b64",
    "step": "lstm-step",
}
TABLE = {**bench_cases.WORKLOADS, **EXTRA}
THREADS = 2


def make(name):
    """The call to time for workload `name` (TABLE, or an alias), warmed by nothing."""
    spec = TABLE[ALIASES.get(name, name)]
    ex = spec[5]
    rnnfast.set_num_threads(ex.get("threads", THREADS))
    case = bench_cases.build_case(name, np.random.default_rng(0), have_torch=False, spec=spec)
    if "layer" not in ex:
        return bench_cases.make_rf_fn(case, "auto")
    # a layer option bench_cases does not pass: the same inference call, built here
    cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[case.kind]
    lay = cls(case.I, case.H, seed=0, num_layers=ex.get("num_layers", 1),
              bidirectional=ex.get("bidirectional", False), **ex["layer"])
    x = case.x
    return lambda: lay(x)


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("workloads:", ",".join(TABLE), "\naliases:",
              ", ".join(f"{a}={n}" for a, n in ALIASES.items()))
        return
    out = []
    for name in argv[0].split(","):
        f = make(name)
        for _ in range(3):
            f()
        meds = []
        for _r in range(7):
            b = 1e9
            for _ in range(3):
                t = time.perf_counter()
                f()
                b = min(b, time.perf_counter() - t)
            meds.append(b)
        out.append(f"{name}={np.median(meds)*1e3:.3f}")
    print(" ".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
