"""Cell variants against the plain LSTM in one process (docs/performance.md, issue 15).

    python tools/variant_speed.py [--rounds 3] [--backend cython] [--train]

Prints, for the lstm-b8 and lstm-b64 shapes of ../shared/BENCHMARKS.md, the median time
of the plain LSTM and each variant's ratio to it (rounds alternate the layers, so that a
slow spell of a shared machine hits them all). With --train, one training step
(``forward(train=True)`` then ``backward``) instead of an inference call.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import rnnfast

VARIANTS = [("peephole", {"peephole": True}), ("clip=50", {"clip": 50.0}),
            ("hard_sigmoid", {"gate_activation": "hard_sigmoid"}), ("input_forget", {"input_forget": True})]


def _median_ms(f, n: int = 9) -> float:
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--train", action="store_true", help="time a training step (forward + backward)")
    args = ap.parse_args()
    with rnnfast.backend(args.backend):
        for B, H in ((8, 256), (64, 512)):
            x = np.random.default_rng(0).standard_normal((100, B, H)).astype(np.float32)
            layers = {"plain": rnnfast.LSTM(H, H, seed=0)}
            layers.update({name: rnnfast.LSTM(H, H, seed=0, **kw) for name, kw in VARIANTS})
            times: dict[str, list[float]] = {k: [] for k in layers}
            dy = np.ones((100, B, H), np.float32)

            def step(lay, x=x, dy=dy):
                if args.train:
                    lay.forward(x, train=True)
                    lay.backward(dy)
                else:
                    lay(x)
            for _ in range(args.rounds):
                for k, lay in layers.items():
                    times[k].append(_median_ms(lambda lay=lay: step(lay)))
            base = float(np.median(times["plain"]))
            print(f"lstm{'-train' if args.train else ''} (100, {B}, {H}): plain {base:.2f} ms; "
                  + ", ".join(f"{k} {np.median(v) / base:.3f}x" for k, v in times.items() if k != "plain"))


if __name__ == "__main__":
    main()
