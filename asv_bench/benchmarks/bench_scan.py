"""Time-parallel recurrences: linear_scan thread scaling on a narrow feature axis
(only time chunking can use the second core), and minGRU against rnnfast's GRU at the
same shape (the mingru-long workload's shape)."""
from __future__ import annotations

import numpy as np

import rnnfast

from .common import FAST_BACKENDS, SMALL, check_backend


class LinearScan:
    """``linear_scan`` on (2**17, 4) float32 (4 features: time chunks are the only parallelism)."""

    params = [FAST_BACKENDS, [1, 2]]
    param_names = ["backend", "threads"]

    def setup(self, backend, threads):
        check_backend(backend)
        T = 2 ** (12 if SMALL else 17)
        rng = np.random.default_rng(0)
        self.a = rng.uniform(0.5, 1.0, (T, 4)).astype(np.float32)
        self.b = rng.standard_normal((T, 4)).astype(np.float32)
        self.backend, self.threads = backend, threads
        self._run()                                   # JIT warm-up

    def _run(self):
        rnnfast.set_num_threads(self.threads)
        with rnnfast.backend(self.backend):
            return rnnfast.linear_scan(self.a, self.b)

    def time_linear_scan(self, backend, threads):
        self._run()


class MinGRUvsGRU:
    """minGRU and GRU layers on (T=4096, B=4, I=H=256), 2 threads: compare the two rows."""

    params = [["mingru", "gru"]]
    param_names = ["layer"]
    timeout = 300

    def setup(self, layer):
        T = 256 if SMALL else 4096
        self.x = np.random.default_rng(0).standard_normal((T, 4, 256)).astype(np.float32)
        self.lay = rnnfast.MinGRU(256, 256, seed=0) if layer == "mingru" else rnnfast.GRU(256, 256, seed=0)
        rnnfast.set_num_threads(2)
        self.lay(self.x)

    def time_forward(self, layer):
        self.lay(self.x)
