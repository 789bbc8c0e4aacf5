"""Compute kernels of rnnfast (installed as ``rnnfast.kernels``).

Kernels never validate their arguments nor allocate for the caller: ``rnnfast._engine``
does both. Inference: ``cy_rnn`` (Cython/OpenMP, with the C headers ``rf_gates.h`` (gate math),
``rf_fused.h`` / ``rf_fused_tmpl.h`` (packing, micro-kernel, fused step, rf_rowdot)) and
``numba_rnn``, both exposing ``run_layer`` with the same signature
(see ``cy_rnn.run_layer``). Training: ``cy_train`` (+ ``rf_train.h``) and ``numba_train``.
Time-parallel scans: ``cy_scan`` (its minGRU/minLSTM projection uses rf_fused.h) and
``numba_scan``. ``tools/kernel_harness`` times the C headers outside Python.
"""
