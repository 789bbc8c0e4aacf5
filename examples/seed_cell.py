"""Train the "seed" cell of issue 19 (a custom cell traced by rnnfast.CustomRNN) on a small
synthetic sequence task, next to rnnfast.LSTM of the same size, and compare loss and time.

Task: delayed copy. Each step gets a random vector; the target is the first feature of the
input DELAY steps earlier (0 for the first DELAY steps), read out linearly from the output.

Run:  python examples/seed_cell.py
"""
from __future__ import annotations

import time

import numpy as np

import rnnfast
from rnnfast import ops

T, B, I, H, DELAY = 40, 32, 4, 64, 3
STEPS, LR = 150, 3e-3


def seed_cell(xp, h, rec):
    """The seed cell: two recurrent passes per step (blocks 0-2 from h, block 3 from f*h)."""
    i = ops.sigmoid(xp[0] + rec(h, 0))
    f = ops.sigmoid(xp[1] + rec(h, 1))
    o = ops.sigmoid(xp[2] + rec(h, 2))
    c = ops.tanh(xp[3] + rec(f * h, 3))
    h_new = o * ops.tanh(h) + i * c
    return h_new, h_new


def batch(rng):
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    target = np.zeros((T, B, 1), np.float32)
    target[DELAY:] = x[:-DELAY, :, :1]
    return x, target


class Adam:
    def __init__(self, params: dict, lr: float):
        self.p, self.lr, self.t = params, lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict):
        self.t += 1
        for k, g in grads.items():
            self.m[k] = 0.9 * self.m[k] + 0.1 * g
            self.v[k] = 0.999 * self.v[k] + 0.001 * g * g
            mh = self.m[k] / (1 - 0.9 ** self.t)
            vh = self.v[k] / (1 - 0.999 ** self.t)
            self.p[k] -= self.lr * mh / (np.sqrt(vh) + 1e-8)      # in place: the layer's live arrays


def train(layer, name: str) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    head = {"w": (rng.standard_normal((H, 1)) / np.sqrt(H)).astype(np.float32), "b": np.zeros(1, np.float32)}
    opt = Adam({**layer.parameters(), **{"head_" + k: v for k, v in head.items()}}, LR)
    x, tgt = batch(rng)
    layer.forward(x, train=True)            # compile / warm up outside the timing
    layer.backward(np.zeros((T, B, H), np.float32))
    losses = []
    t0 = time.perf_counter()
    for step in range(STEPS):
        x, tgt = batch(rng)
        y, _ = layer.forward(x, train=True)
        pred = y @ head["w"] + head["b"]
        err = pred - tgt
        losses.append(float(np.mean(err * err)))
        dpred = 2.0 * err / err.size
        grads = {"head_w": y.reshape(-1, H).T @ dpred.reshape(-1, 1), "head_b": dpred.sum((0, 1))}
        layer.backward(dpred @ head["w"].T)
        grads.update(layer.grads)
        opt.step(grads)
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  {name:8s} step {step:4d}  loss {np.mean(losses[-10:]):.4f}")
    return float(np.mean(losses[-10:])), time.perf_counter() - t0


def main():
    print(f"delayed copy (delay {DELAY}), T={T} B={B} I={I} H={H}, {STEPS} Adam steps, float32")
    t = time.perf_counter()
    seed = rnnfast.CustomRNN(I, H, cell=seed_cell, gates=4, seed=1)
    res_seed = train(seed, "seed")
    print(f"  (seed cell incl. tracing and compilation: {time.perf_counter() - t:.1f} s)")
    res_lstm = train(rnnfast.LSTM(I, H, seed=1), "LSTM")
    print(f"\nfinal loss (mean of the last 10 steps; predicting 0 gives ~{1.0 * (T - DELAY) / T:.2f}):")
    for name, (loss, sec) in [("seed cell", res_seed), ("rnnfast.LSTM", res_lstm)]:
        print(f"  {name:13s} loss {loss:.4f}   train time {sec:.2f} s ({1e3 * sec / STEPS:.1f} ms/step)")


if __name__ == "__main__":
    main()
