"""ONNX out: layer.to_onnx (being written)."""
from __future__ import annotations


def to_onnx(layer, path, lengths: bool = False, initial_state: bool = False):
    raise NotImplementedError("to_onnx is being written")
