"""Cold start, each figure from a fresh Python process (asv ``timeraw_``).

BENCHMARKS.md: ``import rnnfast`` under 0.5 s; the first call of each cell kind under
2 s with a warm on-disk cache. ``setup`` makes that call once in asv's own process
first, which fills Numba's on-disk cache (``cache=True``), so the timed child process
measures the warm-cache first call: kernel import, cache load and one call.
"""
from __future__ import annotations

import textwrap

import rnnfast

from .common import check_backend, skip

# the first call's shape: lstm-b8's (T=100, B=8, I=H=256)
T, B, I, H = 100, 8, 256, 256
LAYERS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "mingru": "MinGRU", "minlstm": "MinLSTM"}


def timeraw_import_rnnfast():
    """``import rnnfast`` (NumPy included), fresh process."""
    return "import rnnfast"


timeraw_import_rnnfast.repeat = 5


def _code(kind: str, backend: str) -> tuple[str, str]:
    setup = textwrap.dedent(f"""
        import numpy as np
        import rnnfast
        layer = rnnfast.{LAYERS[kind]}({I}, {H}, seed=0)
        x = np.random.default_rng(0).standard_normal(({T}, {B}, {I})).astype(np.float32)
        rnnfast.set_num_threads(2)
    """)
    stmt = textwrap.dedent(f"""
        with rnnfast.backend({backend!r}):
            layer(x)
    """)
    return stmt, setup


class FirstCall:
    """First call of each cell kind in a fresh process (``import rnnfast`` and the
    layer's construction are not timed)."""

    params = [list(LAYERS), ["auto", "cython", "numba"]]
    param_names = ["cell", "backend"]
    repeat = 3
    timeout = 600

    def setup(self, kind, backend):
        check_backend(backend)
        if not hasattr(rnnfast, LAYERS[kind]):
            skip(f"rnnfast.{LAYERS[kind]} is not implemented yet")
        stmt, setup = _code(kind, backend)
        env: dict = {}
        try:                      # same call here first: warms the on-disk caches
            exec(setup + stmt, env)
        except (NotImplementedError, ImportError, AttributeError) as e:
            skip(f"{kind} on {backend}: {type(e).__name__}: {e}")

    def timeraw_first_call(self, kind, backend):
        return _code(kind, backend)
