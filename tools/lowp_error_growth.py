"""Error growth of frozen bf16 / int8 layers over long sequences (issue 14, item 5).

Max abs error of y_t against the float64 reference, over windows of steps, for the
referee's layer shapes (I = H = 256) with random inputs and PyTorch's default init:

    python tools/lowp_error_growth.py [--T 2000] [--batch 4]
"""
from __future__ import annotations

import argparse

import numpy as np

import rnnfast
from rnnfast import reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    T, B, H = args.T, args.batch, args.size
    x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
    edges = [e for e in (10, 100, 500, 1000, 2000, 5000, 10000) if e <= T]
    print(f"max |y - y_float64| over steps [a, b), T={T}, B={B}, I=H={H}")
    print(f"{'layer':10s} {'precision':9s} " + " ".join(f"{'<' + str(e):>9s}" for e in edges))
    for kind, cls in (("lstm", rnnfast.LSTM), ("gru", rnnfast.GRU)):
        layer = cls(H, H, seed=0)
        p = layer.parameters()
        y64, _, _ = reference.run_direction(kind, x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                                            p["bias_hh_l0"])
        for prec in ("fp32", "bf16", "int8"):
            y, _ = layer.freeze(prec)(x)
            err = np.abs(y - y64).max(axis=(1, 2))
            lo = 0
            cells = []
            for e in edges:
                cells.append(f"{err[lo:e].max():9.2g}")
                lo = e
            print(f"{kind:10s} {prec:9s} " + " ".join(cells))


if __name__ == "__main__":
    main()
