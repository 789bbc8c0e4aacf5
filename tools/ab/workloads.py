"""Time named workloads in this process: prints name=ms (median of 7 best-of-3 calls).

Used for A/B comparisons of two builds in alternating processes (see ab.sh):
    PYTHONPATH=/path/to/old/tree python tools/ab/workloads.py lstm-b8,bidir
Names: see make(). Shapes follow the standard workloads (rnnfast.bench.WORKLOADS) where they share a name.
"""
import sys
import time

import numpy as np

import rnnfast

rnnfast.set_num_threads(2)
rng = np.random.default_rng(0)
def make(name):
    rnnfast.set_num_threads(2)
    if name == "gru-b1":
        lay, x = rnnfast.GRU(256, 256, seed=0), rng.standard_normal((100, 1, 256))
    elif name == "lstm-b1":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((100, 1, 256))
    elif name == "grun-b8":
        lay, x = rnnfast.GRU(256, 256, linear_before_reset=False, seed=0), rng.standard_normal((100, 8, 256))
    elif name == "grun-b64":
        lay, x = rnnfast.GRU(512, 512, linear_before_reset=False, seed=0), rng.standard_normal((100, 64, 512))
    elif name == "gru-b8":
        lay, x = rnnfast.GRU(256, 256, seed=0), rng.standard_normal((100, 8, 256))
    elif name == "gru-b7":
        lay, x = rnnfast.GRU(256, 256, seed=0), rng.standard_normal((100, 7, 256))
    elif name == "gru512-b8":
        lay, x = rnnfast.GRU(512, 512, seed=0), rng.standard_normal((100, 8, 512))
    elif name == "lstm512-b8":
        lay, x = rnnfast.LSTM(512, 512, seed=0), rng.standard_normal((100, 8, 512))
    elif name == "rnn-b8":
        lay, x = rnnfast.RNN(512, 512, seed=0), rng.standard_normal((100, 8, 512))
    elif name == "lstm-b7":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((100, 7, 256))
    elif name == "lstm-b8":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((100, 8, 256))
    elif name == "rnn-b64":
        lay, x = rnnfast.RNN(512, 512, seed=0), rng.standard_normal((100, 64, 512))
    elif name == "lstm-b64":
        lay, x = rnnfast.LSTM(512, 512, seed=0), rng.standard_normal((100, 64, 512))
    elif name == "bidir":
        lay, x = rnnfast.LSTM(256, 256, num_layers=2, bidirectional=True, seed=0), rng.standard_normal((500, 16, 256))
    elif name == "bidir1":
        lay, x = rnnfast.LSTM(256, 256, bidirectional=True, seed=0), rng.standard_normal((500, 16, 256))
    elif name == "uni16":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((500, 16, 256))
    elif name == "uni16l1":
        rnnfast.set_num_threads(1)
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((500, 16, 256))
    elif name == "lstm-varlen":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((500, 16, 256)).astype(np.float32)
        ln = rng.integers(250, 501, 16)
        return lambda: lay(x, lengths=ln)
    elif name == "train-b8":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((100, 8, 256)).astype(np.float32)
        dy = np.ones_like(x)
        def f():
            lay.forward(x, train=True)
            lay.backward(dy)
        return f
    elif name in ("train-b64", "gtrain-b64"):
        Cls = rnnfast.LSTM if name == "train-b64" else rnnfast.GRU
        lay, x = Cls(512, 512, seed=0), rng.standard_normal((100, 64, 512)).astype(np.float32)
        dy = np.ones_like(x)
        def f():
            lay.forward(x, train=True)
            lay.backward(dy)
        return f
    elif name == "step":
        lay, x = rnnfast.LSTM(256, 256, seed=0), rng.standard_normal((100, 1, 256)).astype(np.float32)
        def f():
            hx = None
            for t in range(100):
                _, hx = lay(x[t:t + 1], hx)
        return f
    x = x.astype(np.float32)
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
