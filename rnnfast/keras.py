"""Keras 3 recurrent models on rnnfast layers (being written)."""
from __future__ import annotations


def from_keras(obj):
    raise NotImplementedError("rnnfast.from_keras is being written")
