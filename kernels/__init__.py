"""Compute kernels of rnnfast (installed as ``rnnfast.kernels``).

Kernels never validate their arguments nor allocate for the caller: ``rnnfast._engine``
does both. ``cy_rnn`` is the Cython/OpenMP backend, ``numba_rnn`` the Numba one; both
expose ``run_layer`` with the same signature (see ``cy_rnn.run_layer``).
"""
