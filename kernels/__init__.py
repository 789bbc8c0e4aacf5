"""Compute kernels of rnnfast (installed as ``rnnfast.kernels``).

Kernels never validate their arguments nor allocate for the caller: ``rnnfast._engine``
does both. Inference: ``cy_rnn`` (Cython/OpenMP, with the C headers ``rf_gates.h`` (gate math),
``rf_fused.h`` / ``rf_fused_tmpl.h`` (packing, micro-kernel, fused step, rf_rowdot)) and
``numba_rnn``, both exposing ``run_layer`` with the same signature
(see ``cy_rnn.run_layer``). Training: ``cy_train`` (+ ``rf_train.h``) and ``numba_train``.
Time-parallel scans: ``cy_scan`` (its minGRU/minLSTM projection uses rf_fused.h) and
``numba_scan``. Frozen bf16 / int8 layers: ``cy_lowp`` (+ ``rf_lowp.h``, ``rf_lowp_gemm.h``).
``tools/kernel_harness`` times the C headers outside Python.

The Cython modules are built once per ISA level (``rnnfast.kernels.<level>.cy_rnn``,
setup.py); ``import rnnfast.kernels.cy_rnn`` loads the level ``_isa.choose()`` picks.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

COMPILED = ("cy_rnn", "cy_train", "cy_scan", "cy_lowp")


class _LevelFinder(importlib.abc.MetaPathFinder):
    """Resolves rnnfast.kernels.<compiled module> to the chosen level's extension."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, name = fullname.rpartition(".")
        if pkg != __name__ or name not in COMPILED:
            return None
        from . import _isa
        level, _ = _isa.choose()
        if not level:
            return None         # single-level build: the module sits in this package
        for d in __path__:
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                f = os.path.join(d, level, name + suffix)
                if os.path.exists(f):
                    loader = importlib.machinery.ExtensionFileLoader(fullname, f)
                    return importlib.util.spec_from_file_location(fullname, f, loader=loader)
        return None


if not any(isinstance(f, _LevelFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _LevelFinder())
