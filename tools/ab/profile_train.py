"""Time one training step (forward(train=True) + backward) and its Cython kernels.

    python tools/ab/profile_train.py lstm 100 8 256      # kind T B H
prints the total and the time spent in cy_train.pgemm, forward_layer, backward_layer
(each wrapped with a timer), averaged over 10 steps after 3 warm-up steps.
"""
import sys
import time

import numpy as np

import rnnfast
import rnnfast.kernels.cy_train as ct

kind, T, B, H = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rnnfast.set_num_threads(2)
acc = {}
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        acc[name] = acc.get(name, 0) + time.perf_counter() - t
        return r
    setattr(mod, name, g)
for n in ("pgemm", "forward_layer", "backward_layer"):
    wrap(ct, n)
Cls = rnnfast.LSTM if kind == "lstm" else rnnfast.GRU
lay = Cls(H, H, seed=0)
x = np.random.standard_normal((T, B, H)).astype(np.float32)
dy = np.random.standard_normal((T, B, H)).astype(np.float32)
def step():
    _y, _ = lay.forward(x, train=True)
    lay.backward(dy)
for _ in range(3):
    step()
acc.clear()
R = 10
t = time.perf_counter()
for _ in range(R):
    step()
tot = (time.perf_counter() - t) / R
print(f"total {tot*1e3:.2f} ms", {k: round(v / R * 1e3, 2) for k, v in acc.items()})
