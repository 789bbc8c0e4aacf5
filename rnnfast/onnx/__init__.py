"""ONNX models in and out.

- :func:`load`: a session that runs an ONNX model's graph, rnnfast executing every
  ``LSTM``, ``GRU`` and ``RNN`` node and ``onnx.reference.ReferenceEvaluator`` the glue;
- :func:`layer_from_node`: the rnnfast layer of one such node;
- :func:`to_onnx`: a layer (or a frozen fp32 layer) written as an ONNX model
  (also ``layer.to_onnx``).

The ``onnx`` package is imported on first use, so ``import rnnfast`` does not need it.
"""
from __future__ import annotations

from ._export import to_onnx
from ._import import OnnxSession, layer_from_node, load

__all__ = ["load", "layer_from_node", "to_onnx", "OnnxSession"]
