"""Train the character LSTM of ``train_char_lstm.py`` with its LSTM run on a dask cluster.

Each step cuts the batch into chunks along the batch axis; the workers of a
``distributed.LocalCluster`` run the LSTM's forward (``rnnfast.dask.predict``) and its
forward + backward (``rnnfast.dask.gradients``, parameter gradients summed over the
chunks), while the embedding, the read-out, the loss and Adam stay in this process.
The LSTM runs forward twice a step (once for the read-out's input, once inside
``gradients``): ``gradients`` needs dy, which depends on the outputs.

Each worker process runs its chunks on ``num_threads=1`` (the layer's own bound, which
travels with it), so that two single-threaded workers share two cores without
oversubscription.

Usage::

    python examples/dask_train_char_lstm.py                 # 30 steps, 2 workers (about a minute)
    python examples/dask_train_char_lstm.py --steps 5 --workers 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import rnnfast

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_char_lstm import Adam, CharModel, load_text, readout_loss  # noqa: E402 - the plain example's model


def loss_and_grads(model: CharModel, inputs: np.ndarray, targets: np.ndarray, chunk: int) -> tuple[float, dict]:
    """``CharModel.loss_and_grads`` with the LSTM's forward and backward on the cluster."""
    import dask.array as da
    p = model.params
    e = p["embed"][inputs]                                              # (B, T, E), batch_first
    e_d = da.from_array(e, chunks=(chunk, -1, -1))
    h = rnnfast.dask.predict(model.lstm, e_d).compute()                 # (B, T, H)
    loss, grads, dh = readout_loss(p, h, targets)
    de_d, lstm_grads = rnnfast.dask.gradients(model.lstm, e_d, dh)
    grads.update(lstm_grads)
    g_embed = np.zeros_like(p["embed"])
    np.add.at(g_embed, inputs, de_d.compute())
    grads["embed"] = g_embed
    return loss, grads


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8, help="sequences per task")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=os.path.join(HERE, "data", "tiny.txt"))
    args = ap.parse_args(argv)
    from distributed import Client, LocalCluster
    data, vocab = load_text(args.text)
    rng = np.random.default_rng(args.seed)
    model = CharModel(len(vocab), args.embed, args.hidden, seed=args.seed)
    model.lstm.num_threads = 1                  # one core per single-threaded worker
    opt = Adam(model.params, lr=args.lr)
    losses = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        print(f"{args.workers} workers x 1 thread; batch {args.batch} x {args.seq} in chunks of {args.chunk}")
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            starts = rng.integers(0, len(data) - args.seq - 1, args.batch)
            batch = data[starts[:, None] + np.arange(args.seq + 1)]
            loss, grads = loss_and_grads(model, batch[:, :-1], batch[:, 1:], args.chunk)
            opt.step(grads)
            losses.append(loss)
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"losses": losses, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
