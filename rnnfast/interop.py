"""Interoperability with PyTorch modules (duck-typed: rnnfast never imports torch) and
Keras models (rnnfast.keras; Keras is imported by the caller, never by rnnfast)."""
from __future__ import annotations

import numpy as np

from .layers import GRU, LSTM, RNN


def from_torch(module):
    """Build the rnnfast layer equivalent to a ``torch.nn.LSTM``, ``GRU`` or ``RNN``.

    The layer gets the module's hyper-parameters and a copy of its weights, in the
    dtype of the module's parameters (float32 or float64).
    """
    cls_name = type(module).__name__
    if cls_name not in ("LSTM", "GRU", "RNN") or not hasattr(module, "state_dict"):
        raise TypeError(f"from_torch: expected a torch.nn.LSTM, GRU or RNN, got {cls_name}")
    sd = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    first = next(iter(sd.values()))
    dtype = np.float64 if first.dtype == np.float64 else np.float32
    kw = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
              dropout=float(module.dropout), bidirectional=module.bidirectional, dtype=dtype)
    if cls_name == "LSTM":
        layer = LSTM(module.input_size, module.hidden_size, proj_size=getattr(module, "proj_size", 0), **kw)
    elif cls_name == "GRU":
        layer = GRU(module.input_size, module.hidden_size, **kw)
    else:
        layer = RNN(module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kw)
    layer.load_state_dict(sd)
    return layer


def from_keras(obj):
    """A callable running a Keras 3 ``LSTM``, ``GRU``, ``SimpleRNN``, ``Bidirectional`` of
    those, or a ``Sequential`` of them on rnnfast layers (see :mod:`rnnfast.keras`)."""
    from .keras import from_keras as _from_keras
    return _from_keras(obj)
