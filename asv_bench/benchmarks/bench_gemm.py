"""The GEMM roofline (rnnfast's own GEMM, which runs the training products, against
NumPy's BLAS on the same operands) and several Python threads serving at once (calls
in flight share the thread count)."""
from __future__ import annotations

import contextlib
import threading

import numpy as np

import rnnfast

from .common import SMALL, THREADS

# (M, N, K, A transposed): a 2048^3 square and the training products of lstm-train-b64
# (projection, dX, dW: 6400 rows of 512 inputs, 4 * 512 gates)
GEMMS = {
    "square-2048": (2048, 2048, 2048, False),
    "train-proj": (6400, 2048, 512, False),
    "train-dx": (6400, 512, 2048, False),
    "train-dw": (2048, 512, 6400, True),
}


class Gemm:
    """C = A @ B in float32 on the bench's threads: ``rnnfast`` (kernels/rf_gemm.h through
    cy_train.pgemm) and ``numpy`` (np.matmul on NumPy's BLAS)."""

    params = [list(GEMMS), ["rnnfast", "numpy"]]
    param_names = ["shape", "impl"]

    def setup(self, shape, impl):
        M, N, K, ta = GEMMS[shape]
        if SMALL:
            M, N, K = max(1, M // 8), max(1, N // 8), max(1, K // 8)
        rng = np.random.default_rng(0)
        self.a = (rng.standard_normal((K, M)).astype(np.float32).T if ta
                  else rng.standard_normal((M, K)).astype(np.float32))
        self.b = rng.standard_normal((K, N)).astype(np.float32)
        self.c = np.empty((M, N), np.float32)
        rnnfast.set_num_threads(THREADS)
        if impl == "rnnfast":
            from rnnfast.kernels import cy_train
            self.fn = lambda: cy_train.pgemm(self.a, self.b, self.c, 0.0, THREADS)
        else:
            from rnnfast import threads
            # NumPy's BLAS on the bench's threads for this benchmark only: the region
            # restores the caller's count at teardown (threads.blas_threads)
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(threads.blas_threads(THREADS))
            self.fn = lambda: np.matmul(self.a, self.b, out=self.c)
        self.fn()

    def teardown(self, shape, impl):
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()

    def time_gemm(self, shape, impl):
        self.fn()


class ConcurrentServing:
    """``callers`` Python threads, each running 20 calls of a GRU(256) layer on 100 steps
    of batch 1 at once (the wall time for all of them): calls in flight share the thread
    count, so two callers stay near the cost of one caller's calls run back to back."""

    params = [[1, 2]]
    param_names = ["callers"]
    CALLS = 20

    def setup(self, callers):
        rnnfast.set_num_threads(THREADS)
        T = 10 if SMALL else 100
        self.layer = rnnfast.GRU(256, 256, seed=0)
        self.x = np.random.default_rng(0).standard_normal((T, 1, 256)).astype(np.float32)
        self.layer(self.x)

    def _serve(self):
        for _ in range(self.CALLS):
            self.layer(self.x)

    def time_callers(self, callers):
        workers = [threading.Thread(target=self._serve) for _ in range(callers)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
