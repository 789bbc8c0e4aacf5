"""Run a layer on a Ray cluster: a callable class for ``ray.data.Dataset.map_batches``,
and inference and data-parallel gradients over NumPy arrays with Ray tasks.

- :class:`Predictor` scores the rows of a Ray Dataset, one sequence (T, I) per row, in
  an actor pool::

      ref = ray.put(layer)                                  # the weights, once
      ds.map_batches(rnnfast.ray.Predictor, fn_constructor_args=(ref,),
                     num_cpus=2, compute=ray.data.ActorPoolStrategy(size=4),
                     batch_size=64, batch_format="numpy")

  Each actor loads the weights once (zero-copy, read-only, from the object store) and
  runs its batches on as many rnnfast threads as it was given CPUs (``num_cpus``).
- :func:`predict` and :func:`gradients` cut NumPy arrays along the batch axis into
  Ray tasks; the layer is put in the object store once per call and every task refers
  to it, so task arguments are object references and a few integers. ``gradients``
  sums the per-chunk parameter gradients in a tree of tasks and equals a whole-batch
  ``forward(train=True)`` + ``backward`` to rounding.

Workers that die mid-job: tasks are retried (``max_retries``, Ray's default 3) and the
result is then whole and correct; when the retries run out, ``predict`` and
``gradients`` raise :class:`WorkerLostError`, never return part of the result. Ray
Data restarts a killed :class:`Predictor` actor and reruns its batches by default
(``max_restarts=-1`` for actor pools); ``map_batches(..., max_restarts=0)`` makes the
job fail with Ray's ``ActorDiedError`` instead (Ray 2.60 takes ``max_restarts`` through
``map_batches``' catch-all remote arguments, which it flags as deprecated).

Ray is imported inside the functions: ``import rnnfast`` does not import it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _scaleout, threads

__all__ = ["Predictor", "predict", "gradients", "WorkerLostError"]


class WorkerLostError(RuntimeError):
    """A Ray worker (or the node, or an object) was lost while a chunk ran, and its task
    ran out of retries: no result is returned, not even the chunks that finished."""


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("rnnfast.ray needs Ray: pip install 'ray[data]'") from e
    return ray


def _is_ref(obj) -> bool:
    # without importing ray when the object cannot be one of its references
    if not type(obj).__module__.startswith("ray"):
        return False
    return isinstance(obj, _ray().ObjectRef)


def _assigned_cpus() -> int | None:
    """The CPUs Ray assigned to the actor or task running this code (at least 1), or
    None outside Ray's workers (a driver, or no Ray)."""
    import sys
    if "ray" not in sys.modules:
        return None
    ray = sys.modules["ray"]
    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    if ctx.get_actor_id() is None and ctx.get_task_id() is None:
        return None                     # the driver: Ray assigns it nothing
    cpus = ctx.get_assigned_resources().get("CPU", 0.0)
    return max(1, math.floor(cpus + 1e-9))


def _probe(layer, where: str):
    """A one-step local call: checks that `layer` runs, and gives its output width,
    dtype and state structure."""
    if not callable(layer) or not hasattr(layer, "input_size"):
        raise TypeError(f"{where}: expected an rnnfast layer or frozen layer, got {type(layer).__name__}")
    dtype = np.dtype(getattr(layer, "dtype", np.float32))
    y, st = layer(np.zeros((1, 1, layer.input_size), dtype))
    return y, _scaleout.states_list(st)


def _check_lengths(lengths, n: int, T: int, where: str) -> np.ndarray | None:
    if lengths is None:
        return None
    ln = np.asarray(lengths)
    if ln.shape != (n,) or ln.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected {n} integer lengths (shape ({n},)), got dtype {ln.dtype} "
                         f"shape {ln.shape}")
    if n and (ln.min() < 0 or ln.max() > T):
        raise ValueError(f"{where}: lengths must be in [0, {T}], got [{ln.min()}, {ln.max()}]")
    return ln


# ------------------------------------------------------------------ map_batches actor
class Predictor:
    """A callable class for ``ray.data.Dataset.map_batches``: runs `layer` over batches
    of rows, one sequence per row.

    Parameters
    ----------
    layer : rnnfast layer or frozen layer, or a ``ray.ObjectRef`` of one
        Inference only. Passed as an object reference (``ray.put(layer)``), every actor
        reads the same copy of the weights from the object store, zero-copy and
        read-only. The layer is not changed.
    num_threads : int, optional
        The most rnnfast threads one batch uses. Default: the CPUs Ray assigned to the
        actor (``map_batches(..., num_cpus=k)`` gives k); outside a Ray worker, no bound
        beyond the layer's own ``num_threads`` and :func:`rnnfast.get_num_threads`.
    input_column : str
        The column of sequences: a (n, T, I) array (batch first per row, whatever the
        layer's ``batch_first``), or an object array of (T_i, I) arrays of different
        lengths (a Ray variable-shaped tensor column), which are zero-padded and run
        with their lengths.
    lengths_column : str or None
        A column of per-row lengths (ints in [0, T]) used when the batch has it. Not
        with ragged sequences, whose lengths are their own.
    output_column : str or None
        The column the outputs go to: (n, T, D*H_out), or per-row (T_i, D*H_out) arrays
        for ragged input. None: no outputs (only the final states).
    state_columns : sequence of str, optional
        Columns for the final states, one per state of the layer (``("h_n", "c_n")`` for
        an LSTM, ``("h_n",)`` otherwise), each per row: (L*D, H) for a stacked layer's
        state, (H,) for a minGRU / minLSTM state.

    Attributes
    ----------
    layer : the layer the batches run on.
    num_threads : int or None
        The thread bound in force (None: none); a call uses ``min(num_threads,
        layer.num_threads, rnnfast.get_num_threads())``.

    Notes
    -----
    The batch returned holds every input column except `input_column` unchanged (ids,
    labels, lengths), plus the output and state columns. Ray Data restarts an actor
    that dies and reruns its batches (its default for actor pools); pass
    ``max_restarts=0`` to ``map_batches`` to fail the job instead.
    """

    def __init__(self, layer: Any, num_threads: int | None = None, *, input_column: str = "x",
                 lengths_column: str | None = "lengths", output_column: str | None = "y",
                 state_columns: Sequence[str] | None = None) -> None:
        if _is_ref(layer):
            layer = _ray().get(layer)
        self.num_threads = threads.check_num_threads(num_threads, "Predictor: num_threads")
        if self.num_threads is None:
            self.num_threads = _assigned_cpus()
        if not isinstance(input_column, str):
            raise TypeError(f"Predictor: input_column must be a str, got {input_column!r}")
        state_columns = tuple(state_columns or ())
        cols = [input_column, output_column, lengths_column, *state_columns]
        if not all(c is None or isinstance(c, str) for c in cols):
            raise TypeError(f"Predictor: column names must be str (or None), got {cols}")
        outs = [c for c in (output_column, *state_columns) if c is not None]
        if not outs:
            raise ValueError("Predictor: no output: give output_column or state_columns")
        if len(set(outs)) != len(outs) or input_column in outs:
            raise ValueError(f"Predictor: output columns must be distinct from each other and from the "
                             f"input column {input_column!r}, got {outs}")
        _, pstates = _probe(layer, "Predictor")
        if state_columns and len(state_columns) != len(pstates):
            raise ValueError(f"Predictor: {type(layer).__name__} returns {len(pstates)} final state(s); "
                             f"state_columns names {len(state_columns)}: {state_columns}")
        self.layer = layer
        self.input_column, self.lengths_column = input_column, lengths_column
        self.output_column, self.state_columns = output_column, state_columns

    def __repr__(self) -> str:
        return f"Predictor({type(self.layer).__name__}, num_threads={self.num_threads})"

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one batch.

        Parameters
        ----------
        batch : dict of str to numpy.ndarray
            A ``batch_format="numpy"`` batch of n rows.

        Returns
        -------
        dict of str to numpy.ndarray
            The batch's other columns, plus the output and state columns (n rows each).
        """
        if self.input_column not in batch:
            raise KeyError(f"Predictor: the batch has no column {self.input_column!r} (columns: {list(batch)})")
        x = batch[self.input_column]
        n = len(x)
        ragged = isinstance(x, np.ndarray) and x.dtype == object
        if ragged:
            if self.lengths_column is not None and self.lengths_column in batch:
                raise ValueError(f"Predictor: ragged sequences carry their own lengths; the batch also has a "
                                 f"column {self.lengths_column!r} (pass lengths_column=None to ignore it)")
            x, lengths = self._pad(x)
        else:
            x = np.asarray(x)
            if x.ndim != 3:
                raise ValueError(f"Predictor: column {self.input_column!r}: expected (rows, T, I) sequences, "
                                 f"got shape {x.shape}")
            lengths = None
            if self.lengths_column is not None and self.lengths_column in batch:
                lengths = _check_lengths(batch[self.lengths_column], n, x.shape[1],
                                         f"Predictor: column {self.lengths_column!r}")
        xl = x if getattr(self.layer, "batch_first", False) else np.swapaxes(x, 0, 1)
        with threads.limit(self.num_threads):
            y, st = self.layer(xl, None, lengths)
        out = {k: v for k, v in batch.items() if k != self.input_column}
        if self.output_column is not None:
            y = y if getattr(self.layer, "batch_first", False) else np.swapaxes(y, 0, 1)
            if ragged:
                rows = np.empty(n, dtype=object)
                rows[:] = [y[i, :t] for i, t in enumerate(lengths)]
                out[self.output_column] = rows
            else:
                out[self.output_column] = np.ascontiguousarray(y)
        for name, s in zip(self.state_columns, _scaleout.states_list(st)):
            # stacked states are (L*D, n, H): one (L*D, H) block per row
            out[name] = np.ascontiguousarray(np.swapaxes(s, 0, 1)) if s.ndim == 3 else s
        return out

    def _pad(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arrs = [np.asarray(r) for r in rows]
        if any(a.ndim != 2 for a in arrs):
            raise ValueError(f"Predictor: column {self.input_column!r}: expected (T_i, I) sequences per row, "
                             f"got shapes {sorted({a.shape for a in arrs})[:4]}")
        widths = {a.shape[1] for a in arrs}
        if len(widths) > 1:
            raise ValueError(f"Predictor: column {self.input_column!r}: rows of different feature sizes {widths}")
        lengths = np.array([a.shape[0] for a in arrs], np.int64)
        T = int(lengths.max(initial=0))
        dtype = np.result_type(*[a.dtype for a in arrs]) if arrs else np.float32
        x = np.zeros((len(arrs), max(T, 1), widths.pop() if widths else 0), dtype)
        for i, a in enumerate(arrs):
            x[i, :len(a)] = a
        return x, lengths


# ------------------------------------------------------------------ tasks
def _predict_task(layer, xb, lengths, nthreads):
    with threads.limit(nthreads):
        return layer(xb, None, lengths)


def _grad_task(layer, xb, dyb, lengths, nthreads):
    with threads.limit(nthreads):
        return _scaleout.grad_block(layer, xb, dyb, lengths)


_REMOTE: dict[str, Any] = {}


def _remote(name: str):
    """The Ray remote function for a task (made once per process)."""
    if name not in _REMOTE:
        ray = _ray()
        fns = {"predict": (_predict_task, 1), "grad": (_grad_task, 2), "add": (_scaleout.add_grads, 1)}
        fn, nret = fns[name]
        _REMOTE[name] = ray.remote(num_returns=nret)(fn)
    return _REMOTE[name]


def _require_init(ray, where: str) -> None:
    if not ray.is_initialized():
        raise RuntimeError(f"{where}: Ray is not initialized; call ray.init(...) (or ray.init(address=...) "
                           "to join a cluster) first")


def _lost_errors(ray) -> tuple:
    ex = ray.exceptions
    names = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError", "OutOfMemoryError",
             "ActorDiedError", "LocalRayletDiedError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


def _get(ray, refs, where: str, max_retries: int):
    """``ray.get(refs)``, a lost worker turned into :class:`WorkerLostError`; the tasks
    of the other chunks are cancelled so that nothing keeps running for no one."""
    try:
        return ray.get(refs)
    except _lost_errors(ray) as e:
        for r in refs if isinstance(refs, list) else [refs]:
            try:
                ray.cancel(r)
            except Exception:  # noqa: BLE001 - best effort: the task may be done or gone
                pass
        raise WorkerLostError(f"{where}: a Ray worker was lost while a chunk ran and its task ran out of "
                              f"retries (max_retries={max_retries}); no partial result is returned: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _default_chunks(ray, B: int, num_cpus: float) -> int:
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
    return max(1, -(-B // slots))


def _check_common(x, num_cpus, num_threads, max_retries, where: str):
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{where}: expected a 3-D array of sequences in the layer's layout, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{where}: expected a numeric array, got dtype {x.dtype}")
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
        raise ValueError(f"{where}: num_cpus must be a number > 0, got {num_cpus!r}")
    nthreads = threads.check_num_threads(num_threads, f"{where}: num_threads")
    if nthreads is None:
        nthreads = max(1, math.floor(num_cpus + 1e-9))
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < -1:
        raise ValueError(f"{where}: max_retries must be an int >= -1 (-1: no limit), got {max_retries!r}")
    return x, nthreads


def _slices(sizes):
    start = 0
    for c in sizes:
        yield slice(start, start + c)
        start += c


def _take(a: np.ndarray, b: int, sl: slice) -> np.ndarray:
    return a[sl] if b == 0 else a[:, sl]


def predict(layer: Any, x: np.ndarray, lengths: np.ndarray | None = None, *,
            chunks: int | Sequence[int] = 64, num_cpus: float = 1, num_threads: int | None = None,
            return_state: bool = False, max_retries: int = 3) -> Any:
    """Run `layer` over a NumPy batch of sequences in Ray tasks, one per chunk of the batch.

    Parameters
    ----------
    layer : rnnfast layer or frozen layer
        Put in the object store once; every task reads it from there.
    x : numpy.ndarray
        (T, B, I), or (B, T, I) when ``layer.batch_first``.
    lengths : array_like of ints (B,), optional
    chunks : int or sequence of int
        Sequences per task (the last chunk takes the rest), or the chunk sizes.
    num_cpus : float
        CPUs each task reserves (Ray's ``num_cpus``).
    num_threads : int, optional
        rnnfast threads per task; default ``floor(num_cpus)``.
    return_state : bool
        Also return the final states.
    max_retries : int
        Reruns of a task whose worker dies (-1: no limit). Past them,
        :class:`WorkerLostError`.

    Returns
    -------
    y : numpy.ndarray
        As ``layer(x, lengths=lengths)[0]``.
    hx_n : numpy.ndarray or tuple of them
        Only with ``return_state``: the final states, as the layer returns them.
    """
    ray = _ray()
    _require_init(ray, "predict")
    x, nthreads = _check_common(x, num_cpus, num_threads, max_retries, "predict")
    b = _scaleout.batch_axis(layer)
    B, T = x.shape[b], x.shape[1 - b]
    if B < 1:
        raise ValueError(f"predict: empty batch (shape {x.shape})")
    if x.shape[2] != getattr(layer, "input_size", x.shape[2]):
        raise ValueError(f"predict: x: expected input feature size {layer.input_size}, got shape {x.shape}")
    sizes = _scaleout.split_sizes(B, chunks, "predict: chunks")
    ln = _check_lengths(lengths, B, T, "predict: lengths")
    _probe(layer, "predict")
    lay = ray.put(layer)
    fn = _remote("predict").options(num_cpus=num_cpus, max_retries=max_retries)
    refs = [fn.remote(lay, ray.put(_take(x, b, sl)), None if ln is None else ln[sl], nthreads)
            for sl in _slices(sizes)]
    outs = _get(ray, refs, "predict", max_retries)
    y = np.concatenate([o[0] for o in outs], axis=b)
    if not return_state:
        return y
    per = [_scaleout.states_list(o[1]) for o in outs]
    states = [np.concatenate([p[k] for p in per], axis=per[0][k].ndim - 2) for k in range(len(per[0]))]
    return y, (tuple(states) if len(states) > 1 else states[0])


def gradients(layer: Any, x: np.ndarray, dy: np.ndarray, lengths: np.ndarray | None = None, *,
              chunks: int | Sequence[int] | None = None, num_cpus: float = 1, num_threads: int | None = None,
              split_every: int = 4, max_retries: int = 3) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Gradients of ``sum(y * dy)`` for a NumPy batch, in Ray tasks, one per chunk.

    Each task runs ``forward(train=True)`` and ``backward(dy)`` on its chunk; the
    per-chunk parameter gradients are summed in a tree of tasks (fan-in `split_every`).
    The result equals a whole-batch ``layer.forward(x, train=True); layer.backward(dy)``
    to rounding. The layer goes to the object store once per call.

    Parameters
    ----------
    layer : rnnfast.LSTM, GRU, RNN, MinGRU or MinLSTM
        With ``dropout == 0`` (per-chunk masks would differ from the whole batch's). Not
        changed: its ``grads`` are left as they were.
    x : numpy.ndarray
        Inputs in the layer's layout.
    dy : numpy.ndarray
        Gradient of the outputs, shaped like ``y``.
    lengths : array_like of ints (B,), optional
    chunks : int or sequence of int, optional
        Sequences per task, or the chunk sizes. Default: one chunk per slot of
        `num_cpus` CPUs in the cluster.
    num_cpus : float
        CPUs each task reserves.
    num_threads : int, optional
        rnnfast threads per task; default ``floor(num_cpus)``.
    split_every : int
        Fan-in of the gradient sum's tree (>= 2).
    max_retries : int
        Reruns of a task whose worker dies (-1: no limit). Past them,
        :class:`WorkerLostError`.

    Returns
    -------
    dx : numpy.ndarray
        Gradient of the inputs, shaped like `x`.
    grads : dict of str to numpy.ndarray
        Keys and shapes as ``layer.grads``.
    """
    ray = _ray()
    _require_init(ray, "gradients")
    _scaleout.check_trainable(layer, "gradients")
    x, nthreads = _check_common(x, num_cpus, num_threads, max_retries, "gradients")
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"gradients: split_every must be an int >= 2, got {split_every!r}")
    b = _scaleout.batch_axis(layer)
    B, T = x.shape[b], x.shape[1 - b]
    if B < 1:
        raise ValueError(f"gradients: empty batch (shape {x.shape})")
    if x.shape[2] != layer.input_size:
        raise ValueError(f"gradients: x: expected input feature size {layer.input_size}, got shape {x.shape}")
    py, _ = _probe(layer, "gradients")
    dy = np.asarray(dy)
    if dy.shape != (*x.shape[:2], py.shape[2]):
        raise ValueError(f"gradients: dy: expected the shape of y, {(*x.shape[:2], py.shape[2])}, got {dy.shape}")
    ln = _check_lengths(lengths, B, T, "gradients: lengths")
    sizes = _scaleout.split_sizes(B, _default_chunks(ray, B, num_cpus) if chunks is None else chunks,
                                  "gradients: chunks")
    lay = ray.put(layer)
    fn = _remote("grad").options(num_cpus=num_cpus, max_retries=max_retries)
    parts = [fn.remote(lay, ray.put(_take(x, b, sl)), ray.put(_take(dy, b, sl)),
                       None if ln is None else ln[sl], nthreads) for sl in _slices(sizes)]
    add = _remote("add").options(num_cpus=0, max_retries=max_retries)
    level = [p[1] for p in parts]
    while len(level) > 1:
        level = [add.remote(*level[i:i + split_every]) if len(level[i:i + split_every]) > 1 else level[i]
                 for i in range(0, len(level), split_every)]
    out = _get(ray, [*(p[0] for p in parts), level[0]], "gradients", max_retries)
    *dxs, grads = out
    dx = np.concatenate(dxs, axis=b)
    # arrays read from the object store are read-only views of it: hand out writable copies
    grads = {k: np.array(v, copy=True) if not v.flags.writeable else v for k, v in grads.items()}
    return dx, grads
