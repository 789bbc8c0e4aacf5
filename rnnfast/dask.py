"""Run a layer over a dask array of sequences: inference and gradients, chunk by chunk.

``rnnfast.dask.predict(layer, x)`` and ``rnnfast.dask.gradients(layer, x, dy)`` split the
work along the batch axis only: each task runs the whole sequences of its chunk, so the
time axis and the features must each be one chunk (they are rechunked to one when they
are not). The layer enters the graph once, as a single object that every task refers to
(its weights travel once per worker, never once per task). dask is imported inside the
functions: ``import rnnfast`` does not import it.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ._scaleout import add_grads, batch_axis, check_trainable, grad_block, states_list

__all__ = ["predict", "gradients"]


def _modules():
    try:
        import dask
        import dask.array as da
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("rnnfast.dask needs dask: pip install 'dask[array]' (and distributed for a "
                          "cluster)") from e
    return dask, da


def _as_batch_chunked(da, x, name: str, layer, chunks=None):
    """`x` as a 3-D dask array with one chunk along time and features (and the batch
    chunks `chunks` when given)."""
    if not hasattr(x, "chunks"):
        x = da.from_array(np.asarray(x), chunks=-1)
    if x.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D dask array ({'(B, T, F)' if batch_axis(layer) == 0 else '(T, B, F)'}"
                         f", batch chunked), got {x.ndim}-D with shape {x.shape}")
    b = batch_axis(layer)
    want = {ax: -1 for ax in range(3) if ax != b}
    if chunks is not None:
        want[b] = chunks
    if any(len(x.chunks[ax]) != 1 for ax in range(3) if ax != b) or (chunks is not None and x.chunks[b] != chunks):
        # a sequence must be one task's: time and features in one chunk each
        x = x.rechunk(want)
    return x


def _split_lengths(da, lengths, chunks):
    """`lengths` cut into the batch chunks: a list of NumPy arrays or delayed objects."""
    if lengths is None:
        return [None] * len(chunks)
    if hasattr(lengths, "chunks"):
        ln = lengths.rechunk((chunks,))
        return list(ln.to_delayed().ravel())
    arr = np.asarray(lengths)
    if arr.shape != (sum(chunks),):
        raise ValueError(f"lengths: expected shape ({sum(chunks)},), got {arr.shape}")
    out, start = [], 0
    for c in chunks:
        out.append(arr[start:start + c])
        start += c
    return out


def _predict_block(layer, xb, lengths):
    return layer(xb, None, lengths)


def predict(layer, x, lengths=None, return_state: bool = False) -> Any:
    """Run `layer` (a layer or frozen layer) over a dask array of sequences.

    Parameters
    ----------
    layer : rnnfast layer or frozen layer
        Inference only; its weights enter the graph once.
    x : dask.array.Array
        (T, B, I), or (B, T, I) when ``layer.batch_first``; chunked along the batch axis
        (time and features are rechunked to one chunk each when they are not).
    lengths : array_like or dask array of ints (B,), optional
        Per-sequence lengths, cut like the batch.
    return_state : bool
        Also return the final states.

    Returns
    -------
    y : dask.array.Array
        The outputs, chunked like `x` along the batch.
    hx_n : dask.array.Array or tuple of them
        Only with ``return_state``: the final states as ``layer(x)`` returns them (LSTM
        ``(h, c)``), chunked along their batch axis.
    """
    dask, da = _modules()
    x = _as_batch_chunked(da, x, "x", layer)
    b = batch_axis(layer)
    chunks = x.chunks[b]
    # a tiny local call gives the output widths, dtypes and state structure
    probe_x = np.zeros((1, 1, x.shape[2]), x.dtype if x.dtype.kind == "f" else np.float32)
    py, pst = layer(probe_x)
    pstates = states_list(pst)
    lay = dask.delayed(layer, pure=True)       # one key: every task refers to it
    blocks = x.to_delayed()
    blocks = blocks.reshape(-1) if b == 0 else blocks[0, :, 0]
    lens = _split_lengths(da, lengths, chunks)
    T = x.shape[1 - b]
    ys, sts = [], [[] for _ in pstates]
    for xb, lb, nb in zip(blocks, lens, chunks):
        out = dask.delayed(_predict_block, pure=True)(lay, xb, lb)
        yshape = (nb, T, py.shape[2]) if b == 0 else (T, nb, py.shape[2])
        ys.append(da.from_delayed(out[0], yshape, dtype=py.dtype))
        if return_state:
            st = out[1]
            for k, ps in enumerate(pstates):
                sk = st[k] if len(pstates) > 1 else st
                shape = (*ps.shape[:-2], nb, ps.shape[-1]) if ps.ndim == 3 else (nb, ps.shape[-1])
                sts[k].append(da.from_delayed(sk, shape, dtype=ps.dtype))
    y = da.concatenate(ys, axis=b)
    if not return_state:
        return y
    states = [da.concatenate(s, axis=ps.ndim - 2) for s, ps in zip(sts, pstates)]
    return y, (tuple(states) if len(states) > 1 else states[0])


def gradients(layer, x, dy, lengths=None, split_every: int = 4) -> tuple[Any, dict[str, np.ndarray]]:
    """Gradients of ``sum(y * dy)`` over a dask array of sequences, chunk by chunk.

    Each task runs ``forward(train=True)`` and ``backward(dy)`` on its chunk of the
    batch; the per-chunk parameter gradients are summed in a tree. The result equals a
    whole-batch ``layer.forward(x, train=True); layer.backward(dy)`` to rounding.

    Parameters
    ----------
    layer : rnnfast.LSTM, GRU, RNN, MinGRU or MinLSTM
        With ``dropout == 0`` (per-chunk dropout masks would differ from the whole
        batch's, so dropout is refused). The layer itself is not changed: its ``grads``
        are left as they were.
    x : dask.array.Array
        Inputs in the layer's layout, chunked along the batch.
    dy : dask.array.Array or array_like
        Gradient of the outputs, shaped like ``y``; rechunked like `x`.
    lengths : array_like or dask array of ints (B,), optional
    split_every : int
        Fan-in of the gradient sum's tree.

    Returns
    -------
    dx : dask.array.Array
        Gradient of the inputs, shaped and chunked like `x` (its chunks already computed
        and held by the scheduler).
    grads : dict of str to numpy.ndarray
        Computed, keys and shapes as ``layer.grads``.
    """
    dask, da = _modules()
    check_trainable(layer, "gradients")
    x = _as_batch_chunked(da, x, "x", layer)
    b = batch_axis(layer)
    chunks = x.chunks[b]
    dy = _as_batch_chunked(da, dy, "dy", layer, chunks=chunks)
    if dy.shape[:2] != x.shape[:2]:
        raise ValueError(f"dy: expected the leading shape {x.shape[:2]} of x, got {dy.shape}")
    lay = dask.delayed(layer, pure=True)
    xb = x.to_delayed()
    dyb = dy.to_delayed()
    xb = xb.reshape(-1) if b == 0 else xb[0, :, 0]
    dyb = dyb.reshape(-1) if b == 0 else dyb[0, :, 0]
    lens = _split_lengths(da, lengths, chunks)
    parts = [dask.delayed(grad_block, pure=True)(lay, a, d, ln) for a, d, ln in zip(xb, dyb, lens)]
    parts = list(dask.persist(*parts))          # run once: dx and grads both come from these
    level = [p[1] for p in parts]
    while len(level) > 1:
        level = [dask.delayed(add_grads, pure=True)(*level[i:i + split_every])
                 for i in range(0, len(level), split_every)]
    (grads,) = dask.compute(level[0])
    T = x.shape[1 - b]
    dxs = []
    for p, nb in zip(parts, chunks):
        shape = (nb, T, x.shape[2]) if b == 0 else (T, nb, x.shape[2])
        dxs.append(da.from_delayed(dask.delayed(operator.getitem)(p, 0), shape, dtype=layer.dtype))
    return da.concatenate(dxs, axis=b), grads
