"""Train a character-level LSTM language model with rnnfast and a few lines of NumPy.

The model is an embedding, one ``rnnfast.LSTM`` and a linear read-out, trained with
softmax cross-entropy and Adam on the small text that ships with the examples
(``examples/data/tiny.txt``). It prints the loss as it falls and then samples text,
one character at a time, carrying the LSTM state between calls.

Usage::

    python examples/train_char_lstm.py              # full run (well under 2 minutes)
    python examples/train_char_lstm.py --steps 40   # a shortened run (what the tests do)
    python examples/train_char_lstm.py --backend numba --threads 2
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import rnnfast

HERE = os.path.dirname(os.path.abspath(__file__))


def load_text(path: str) -> tuple[np.ndarray, list[str]]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return np.array([index[ch] for ch in text], np.int64), vocab


class CharModel:
    """Embedding -> LSTM -> linear -> softmax; parameters in float32."""

    def __init__(self, vocab_size: int, embed: int, hidden: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lstm = rnnfast.LSTM(embed, hidden, batch_first=True, seed=seed)
        self.params = {
            "embed": (0.1 * rng.standard_normal((vocab_size, embed))).astype(np.float32),
            "w_out": (rng.standard_normal((vocab_size, hidden)) / np.sqrt(hidden)).astype(np.float32),
            "b_out": np.zeros(vocab_size, np.float32),
        }
        self.params.update(self.lstm.parameters())       # live arrays: Adam updates them in place

    def loss_and_grads(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, dict]:
        """Mean cross-entropy of next-character prediction over a (B, T) batch, and its gradients."""
        p = self.params
        e = p["embed"][inputs]                                   # (B, T, E)
        h, _ = self.lstm.forward(e, train=True)                  # (B, T, H)
        loss, grads, dh = readout_loss(p, h, targets)
        de, _ = self.lstm.backward(dh)                           # fills self.lstm.grads
        grads.update(self.lstm.grads)
        g_embed = np.zeros_like(p["embed"])
        np.add.at(g_embed, inputs, de)
        grads["embed"] = g_embed
        return loss, grads

    def sample(self, start: int, n: int, rng: np.random.Generator, temperature: float = 0.7) -> list[int]:
        """Generate `n` characters, one inference call per character, state carried."""
        p = self.params
        out, ch, hx = [], start, None
        for _ in range(n):
            y, hx = self.lstm(p["embed"][ch][None, :], hx)        # unbatched: (1, E) -> (1, H)
            logits = (y[0] @ p["w_out"].T + p["b_out"]) / temperature
            prob = np.exp(logits - logits.max())
            prob /= prob.sum()
            ch = int(rng.choice(len(prob), p=prob))
            out.append(ch)
        return out


class Adam:
    def __init__(self, params: dict, lr: float = 5e-3, betas=(0.9, 0.999), eps: float = 1e-8, clip: float = 5.0):
        self.params, self.lr, self.b1, self.b2, self.eps, self.clip = params, lr, betas[0], betas[1], eps, clip
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict) -> None:
        self.t += 1
        norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
        scale = min(1.0, self.clip / (norm + 1e-12))              # global gradient-norm clipping
        for k, g in grads.items():
            g = g * scale
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mh = self.m[k] / (1 - self.b1 ** self.t)
            vh = self.v[k] / (1 - self.b2 ** self.t)
            self.params[k] -= (self.lr * mh / (np.sqrt(vh) + self.eps)).astype(self.params[k].dtype)


def readout_loss(p: dict, h: np.ndarray, targets: np.ndarray) -> tuple[float, dict, np.ndarray]:
    """Linear read-out + softmax cross-entropy of the LSTM outputs `h` (B, T, H): the mean
    loss, the read-out's gradients (w_out, b_out) and the gradient of `h`."""
    logits = h @ p["w_out"].T + p["b_out"]                       # (B, T, V)
    logits -= logits.max(axis=-1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=-1, keepdims=True)
    B, T = targets.shape
    picked = np.take_along_axis(prob, targets[..., None], axis=-1)[..., 0]
    loss = float(-np.log(picked + 1e-12).mean())
    dlogits = prob
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1)
    dlogits /= B * T
    grads = {"w_out": np.einsum("btv,bth->vh", dlogits, h), "b_out": dlogits.sum(axis=(0, 1))}
    return loss, grads, dlogits @ p["w_out"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps (default 600; e.g. 40 for a quick run)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--sample", type=int, default=300, help="characters to sample at the end")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default=os.path.join(HERE, "data", "tiny.txt"))
    args = ap.parse_args(argv)
    if args.threads:
        rnnfast.set_num_threads(args.threads)
    rnnfast.set_backend(args.backend)
    data, vocab = load_text(args.text)
    rng = np.random.default_rng(args.seed)
    model = CharModel(len(vocab), args.embed, args.hidden, seed=args.seed)
    opt = Adam(model.params, lr=args.lr)
    print(f"text: {len(data)} characters, vocabulary {len(vocab)}; LSTM {args.embed}->{args.hidden}, "
          f"batch {args.batch} x {args.seq}, backend {args.backend}, {rnnfast.get_num_threads()} threads")
    losses = []
    every = max(1, args.steps // 12)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(data) - args.seq - 1, args.batch)
        idx = starts[:, None] + np.arange(args.seq + 1)
        batch = data[idx]
        loss, grads = model.loss_and_grads(batch[:, :-1], batch[:, 1:])
        opt.step(grads)
        losses.append(loss)
        if step % every == 0 or step == 1 or step == args.steps:
            recent = np.mean(losses[-every:])
            print(f"step {step:5d}  loss {recent:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    text = "".join(vocab[i] for i in model.sample(int(data[0]), args.sample, rng))
    print("\nsample:\n" + vocab[int(data[0])] + text)
    return {"losses": losses, "sample": text, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
