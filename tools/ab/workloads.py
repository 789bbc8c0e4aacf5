"""Time named workloads in this process: prints name=ms (median of 7 best-of-3 calls).

Used for A/B comparisons of two builds in alternating processes (see ab.sh):
    PYTHONPATH=/path/to/old/tree python tools/ab/workloads.py lstm-b8,bidir
Names: see TABLE. Shapes follow the standard workloads (rnnfast.bench_cases.WORKLOADS) where they share a name.
"""
import sys
import time

import numpy as np

import rnnfast

rnnfast.set_num_threads(2)
rng = np.random.default_rng(0)

# name: (layer class, input and hidden size, T, B, options, mode); the public API only,
# so that an older tree runs the same calls. Modes: "infer", "train" (forward and
# backward), "step" (100 calls of one step, state carried), "varlen" (lengths 250-500),
# "1thread" (inference on one thread).
L, G, R = "LSTM", "GRU", "RNN"
NOLBR = {"linear_before_reset": False}
TABLE = {
    "gru-b1": (G, 256, 100, 1, {}, "infer"),
    "lstm-b1": (L, 256, 100, 1, {}, "infer"),
    "grun-b8": (G, 256, 100, 8, NOLBR, "infer"),
    "grun-b64": (G, 512, 100, 64, NOLBR, "infer"),
    "gru-b8": (G, 256, 100, 8, {}, "infer"),
    "gru-b7": (G, 256, 100, 7, {}, "infer"),
    "gru512-b8": (G, 512, 100, 8, {}, "infer"),
    "lstm512-b8": (L, 512, 100, 8, {}, "infer"),
    "rnn-b8": (R, 512, 100, 8, {}, "infer"),
    "lstm-b7": (L, 256, 100, 7, {}, "infer"),
    "lstm-b8": (L, 256, 100, 8, {}, "infer"),
    "rnn-b64": (R, 512, 100, 64, {}, "infer"),
    "lstm-b64": (L, 512, 100, 64, {}, "infer"),
    "bidir": (L, 256, 500, 16, {"num_layers": 2, "bidirectional": True}, "infer"),
    "bidir1": (L, 256, 500, 16, {"bidirectional": True}, "infer"),
    "uni16": (L, 256, 500, 16, {}, "infer"),
    "uni16l1": (L, 256, 500, 16, {}, "1thread"),
    "lstm-varlen": (L, 256, 500, 16, {}, "varlen"),
    "train-b8": (L, 256, 100, 8, {}, "train"),
    "train-b64": (L, 512, 100, 64, {}, "train"),
    "gtrain-b64": (G, 512, 100, 64, {}, "train"),
    "step": (L, 256, 100, 1, {}, "step"),
}


def make(name):
    """The call to time for workload `name` (see TABLE)."""
    cls, n, T, B, opts, mode = TABLE[name]
    rnnfast.set_num_threads(1 if mode == "1thread" else 2)
    lay = getattr(rnnfast, cls)(n, n, seed=0, **opts)
    x = rng.standard_normal((T, B, n)).astype(np.float32)
    if mode == "varlen":
        ln = rng.integers(250, 501, B)
        return lambda: lay(x, lengths=ln)
    if mode == "train":
        dy = np.ones((T, B, n * (2 if opts.get("bidirectional") else 1)), np.float32)

        def train():
            lay.forward(x, train=True)
            lay.backward(dy)
        return train
    if mode == "step":
        def steps():
            hx = None
            for t in range(T):
                _, hx = lay(x[t:t + 1], hx)
        return steps
    return lambda: lay(x)


out = []
for name in sys.argv[1].split(","):
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
