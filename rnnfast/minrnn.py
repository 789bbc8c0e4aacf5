"""Layers ``MinGRU`` and ``MinLSTM``: the time-parallel recurrences of :mod:`rnnfast.scan`
with parameters, ``state_dict`` and training (SPEC "Recurrences that run in parallel
over time", "Layers", "Training").

Parameters (weights (H, I), biases (H,)), initialised U(-1/sqrt(H), 1/sqrt(H)) from
``np.random.default_rng(seed)`` in the order listed:

- MinGRU: ``weight_z``, ``weight_h``, ``bias_z``, ``bias_h``;
- MinLSTM: ``weight_f``, ``weight_i``, ``weight_h``, ``bias_f``, ``bias_i``, ``bias_h``.

``layer(x, hx=None, lengths=None)`` returns ``(y, h_n)`` with hx, h_n (B, H), or (H,)
for an unbatched (T, I) input. ``forward(..., train=True)`` keeps the converted input,
the projections and a copy of the outputs (about what PyTorch keeps for the same
layer); ``backward(dy, dhx_n=None)`` returns ``(dx, dhx)`` and fills ``grads``.
"""
from __future__ import annotations

import numpy as np

from . import _engine, scan
from .layers import _check_dtype, _check_int, _PickledAsParameters

__all__ = ["MinGRU", "MinLSTM"]


class _MinRNNBase(_PickledAsParameters):
    """Shared machinery of MinGRU and MinLSTM."""

    _kind = ""
    _gates: tuple[str, ...] = ()     # weight suffixes in kernel order

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, batch_first: bool = False,
                 dtype=np.float32, seed=None, *, num_threads: int | None = None):
        self.num_threads = num_threads
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dtype = _check_dtype(dtype)
        self.seed = seed
        self.grads: dict[str, np.ndarray] = {}
        self._ctx = None
        H, I = self.hidden_size, self.input_size
        k = 1.0 / np.sqrt(H)
        rng = np.random.default_rng(seed)
        self._shapes: dict[str, tuple] = {f"weight_{g}": (H, I) for g in self._gates}
        if self.bias:
            self._shapes.update({f"bias_{g}": (H,) for g in self._gates})
        self._params: dict[str, np.ndarray] = {
            name: _engine.aligned_copy(rng.uniform(-k, k, shape), self.dtype)
            for name, shape in self._shapes.items()}

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, np.ndarray]:
        """The live parameter arrays; in-place updates are seen by the next call."""
        return dict(self._params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters."""
        return {k: v.copy() for k, v in self._params.items()}

    # ------------------------------------------------------------------ forward / backward
    def _prepare(self, x, hx, lengths):
        p = self._params
        weights = [p[f"weight_{g}"] for g in self._gates]
        biases = [p.get(f"bias_{g}") for g in self._gates]
        return scan._prepare(self._kind, x, weights, biases, hx, lengths, self.batch_first, h0_name="hx")

    def _forward(self, x, hx=None, lengths=None, train: bool = False):
        """Run the layer (``forward`` / ``__call__``, under the layer's ``num_threads``).

        Parameters
        ----------
        x : array_like (T, B, I), (B, T, I) with batch_first, or unbatched (T, I).
        hx : initial state (B, H), or (H,) unbatched; zeros when None.
        lengths : int array_like (B,), optional: outputs past a sequence's length are 0
            and its final state is that after its last valid step.
        train : keep what :meth:`backward` needs.

        Returns
        -------
        y : (T, B, H) (or (B, T, H), or (T, H));  h_n : (B, H) (or (H,)).
        """
        prep = self._prepare(x, hx, lengths)
        y2, hn, proj = scan._forward(prep, keep=bool(train))
        hn = hn.astype(self.dtype)
        if train:
            self._ctx = (prep, proj, y2.copy())
        return scan._user_layout(y2, prep), (hn[0] if prep.unbatched else hn)

    def _backward(self, dy, dhx_n=None):
        """Gradients of sum(y*dy) + sum(h_n*dhx_n) after a ``forward(..., train=True)``.

        Returns ``(dx, dhx)`` shaped like x and hx (dhx (B, H), or (H,) unbatched); fills
        :attr:`grads` (same keys and shapes as :meth:`state_dict`). Uses the weights as
        they are now (update them after backward).
        """
        if self._ctx is None:
            raise RuntimeError("backward() needs a forward(..., train=True) call first")
        prep, proj, y2 = self._ctx
        p = self._params
        # the weights as they are now (the forward's projections are kept as they were)
        prep.wcat = np.concatenate([np.asarray(p[f"weight_{g}"], prep.dtype) for g in self._gates])
        dx, dh0, dw, db = scan.minrnn_backward(prep, proj, y2, dy, dhx_n)
        H = self.hidden_size
        grads = {}
        for j, g in enumerate(self._gates):
            grads[f"weight_{g}"] = dw[j * H:(j + 1) * H].astype(self.dtype)
        if self.bias:
            for j, g in enumerate(self._gates):
                grads[f"bias_{g}"] = db[j * H:(j + 1) * H].astype(self.dtype)
        self.grads = grads
        return dx, (dh0[0] if prep.unbatched else dh0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dtype={self.dtype.name})")


class MinGRU(_MinRNNBase):
    """minGRU layer: z = sigmoid(x W_z^T + b_z), h~ = x W_h^T + b_h, h_t = (1-z)*h_{t-1} + z*h~."""

    _kind = "mingru"
    _gates = ("z", "h")


class MinLSTM(_MinRNNBase):
    """minLSTM layer: f, i = sigmoid(x W_{f,i}^T + b_{f,i}), h~ = x W_h^T + b_h,
    h_t = f/(f+i) * h_{t-1} + i/(f+i) * h~."""

    _kind = "minlstm"
    _gates = ("f", "i", "h")
