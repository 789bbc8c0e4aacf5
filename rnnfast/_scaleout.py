"""Pieces shared by the scale-out front ends (``rnnfast.dask`` and ``rnnfast.ray``): the
batch axis of a layer, the checks a data-parallel gradient step makes before any work,
the per-chunk forward + backward, and the sum of per-chunk parameter gradients.
Nothing here imports a cluster framework."""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import numpy as np

__all__ = ["batch_axis", "check_trainable", "split_sizes", "grad_block", "add_grads", "states_list"]


def batch_axis(layer) -> int:
    """The batch axis of `layer`'s inputs and outputs: 0 with ``batch_first``, else 1."""
    return 0 if getattr(layer, "batch_first", False) else 1


def check_trainable(layer, where: str) -> None:
    """Refuse, before any work, a layer whose chunked gradients would not equal the
    whole batch's: frozen layers (no backward) and dropout (masks drawn per chunk)."""
    if not hasattr(layer, "backward") or type(layer).__name__.startswith("Frozen"):
        raise TypeError(f"{where}: expected a trainable rnnfast layer, got {type(layer).__name__}")
    if getattr(layer, "dropout", 0.0):
        raise ValueError(f"{where}: dropout={layer.dropout} would draw different masks per chunk than "
                         "for the whole batch; use a layer with dropout=0")


def split_sizes(n: int, chunks: int | Sequence[int], where: str = "chunks") -> tuple[int, ...]:
    """Batch chunk sizes: `chunks` rows per chunk (the last one shorter), or explicit
    sizes that must add up to `n`."""
    if isinstance(chunks, (bool, np.bool_)):
        raise TypeError(f"{where}: expected an int or a sequence of ints, got {chunks!r}")
    if isinstance(chunks, (int, np.integer)):
        c = int(chunks)
        if c < 1:
            raise ValueError(f"{where}: expected a chunk size >= 1, got {c}")
        return tuple(min(c, n - s) for s in range(0, n, c))
    try:
        sizes = tuple(operator.index(c) for c in chunks)
    except TypeError as e:
        raise TypeError(f"{where}: expected an int or a sequence of ints, got {chunks!r}") from e
    if any(c < 0 for c in sizes) or sum(sizes) != n:
        raise ValueError(f"{where}: sizes {sizes} must be >= 0 and add up to the batch size {n}")
    return sizes


def grad_block(layer, xb, dyb, lengths):
    """``forward(train=True)`` then ``backward(dyb)`` on one chunk, on a private shallow
    copy of `layer` (the training context is per object, and tasks of one process may
    share the layer); returns ``(dx, grads)``."""
    lay = copy.copy(layer)
    lay.__dict__ = dict(layer.__dict__)
    lay._ctx, lay.grads = None, {}
    lay.forward(xb, None, lengths, train=True)
    dx, _ = lay.backward(dyb)
    return dx, lay.grads


def add_grads(*parts: dict) -> dict:
    """The key-wise sum of gradient dicts, in new arrays (the parts are left as they are:
    they may be read-only buffers of an object store)."""
    out = {k: np.array(v, copy=True) for k, v in parts[0].items()}
    for p in parts[1:]:
        if p.keys() != out.keys():
            raise ValueError(f"add_grads: gradient keys differ: {sorted(out)} vs {sorted(p)}")
        for k, v in p.items():
            out[k] += v
    return out


def states_list(st) -> list:
    """A layer's final states as a list: ``[h]``, or ``[h, c]`` for an LSTM."""
    return list(st) if isinstance(st, tuple) else [st]
