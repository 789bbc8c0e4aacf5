"""rnnfast: fast CPU recurrent layers for NumPy with PyTorch-compatible weights.

Kernels (the Cython extension and the Numba module) load lazily, on first use, so that
``import rnnfast`` stays fast.
"""
from __future__ import annotations

import pkgutil as _pkgutil

# The compiled kernels are installed as rnnfast.kernels (from kernels/ in the source
# tree). When Python imports rnnfast from a source checkout (``python -m rnnfast`` in
# the repository root after ``pip install .``), let submodules missing here, i.e. the
# kernels, resolve in the installed copy as well.
__path__ = _pkgutil.extend_path(__path__, __name__)

from . import onnx, ops
from .backends import available_backends, backend, get_backend, set_backend
from .custom import CustomRNN
from .frozen import FrozenMinRNN, FrozenRNN, Stream
from .functional import gru, lstm, rnn
from .info import show_config
from .interop import from_keras, from_torch
from .layers import GRU, LSTM, RNN
from .memory import memory_info, release_memory
from .minrnn import MinGRU, MinLSTM
from .scan import linear_scan, mingru, minlstm
from .threads import get_num_threads, set_num_threads
from .training import (
                       gru_backward,
                       gru_forward_train,
                       lstm_backward,
                       lstm_forward_train,
                       rnn_backward,
                       rnn_forward_train,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # rnnfast.dask and rnnfast.ray on first use: importing them costs nothing (they
    # import their framework lazily), but keeping them out of ``import rnnfast`` keeps
    # the cold start as measured
    if name in ("dask", "ray"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    # inference
    "lstm", "gru", "rnn", "LSTM", "GRU", "RNN", "from_torch",
    # interop
    "onnx", "from_keras",
    # recurrences parallel over time
    "linear_scan", "mingru", "minlstm", "MinGRU", "MinLSTM",
    # custom cells
    "CustomRNN", "ops",
    # serving
    "FrozenRNN", "FrozenMinRNN", "Stream",
    # backends, threads, memory, configuration
    "available_backends", "set_backend", "get_backend", "backend", "set_num_threads", "get_num_threads",
    "release_memory", "memory_info", "show_config",
    # training, functional
    "lstm_forward_train", "lstm_backward", "gru_forward_train", "gru_backward", "rnn_forward_train",
    "rnn_backward",
    "__version__",
]
