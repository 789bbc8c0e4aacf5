"""The engine's work plan, the same for both compiled backends (rnnfast/_engine.py):
input projections a chunk of steps at a time, and a long call that Ctrl-C stops."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import rnnfast
from rnnfast import _engine

from conftest import VARIANT_IDS, VARIANTS, flat_states, make_layer, ref_stack, rng_for

FAST = ["cython", "numba"]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 20])
@pytest.mark.parametrize("lengths", ["none", "varlen"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_projection_chunks_match_reference(backend, variant, chunk_rows, lengths, nthreads, monkeypatch):
    """Input projections computed a few steps at a time (chunks of 1 step, of steps not
    dividing T, with sequences of different lengths, both directions, two layers) give
    the reference results, in both compiled backends."""
    _, kind, opts = variant
    monkeypatch.setattr(_engine, "_CHUNK_ABOVE", 0)
    monkeypatch.setattr(_engine, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(_engine, "_CHUNK_MIN_ROWS", chunk_rows)
    T, B, I, H = 13, 5, 7, 20
    lay = make_layer(kind, opts, I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=9)
    rng = rng_for("chunks", kind, str(opts), chunk_rows, lengths)
    x = rng.standard_normal((T, B, I))
    ln = None
    if lengths == "varlen":
        ln = rng.integers(0, T + 1, B)
        ln[1] = T
    want_y, want_h = ref_stack(lay, x, lengths=ln)
    rnnfast.set_num_threads(nthreads)
    with rnnfast.backend(backend):
        got_y, got_h = lay(x, lengths=ln)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-10, atol=1e-12)
    for g, w in zip(flat_states(got_h), flat_states(want_h)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_chunk_steps_rule():
    assert _engine._CHUNK_ABOVE == 64 << 20 and _engine._CHUNK_BYTES == 8 << 20
    assert _engine._chunk_steps(100, 64, 2048, 4) == 100        # lstm-b64: 52 MB, at once
    assert _engine._chunk_steps(100, 1, 1024, 4) == 100         # lstm-b1
    assert _engine._chunk_steps(1000, 64, 2048, 4) == 16        # 524 MB: 8 MB chunks
    assert _engine._chunk_steps(100, 4096, 4096, 4) == 1        # at least one step
    assert _engine._chunk_steps(10 ** 6, 1, 4096, 4) == 512     # 8 MB of 16 KB rows


@pytest.mark.parametrize("backend", FAST)
def test_long_input_is_projected_in_chunks(backend, monkeypatch):
    """An input whose projections exceed _CHUNK_ABOVE runs in chunks, and the scratch
    buffer holds one chunk, not all steps (the Numba path held T x B x G*H before)."""
    monkeypatch.setattr(_engine, "_CHUNK_ABOVE", 1 << 20)
    monkeypatch.setattr(_engine, "_CHUNK_BYTES", 64 << 10)
    T, B, I, H = 300, 4, 16, 64         # 300 * 4 * 256 * 4 B = 1.2 MB of projections
    lay = make_layer("lstm", {}, I, H, dtype=np.float32, seed=2)
    x = rng_for("long").standard_normal((T, B, I)).astype(np.float32)
    asked = {}
    real = _engine.scratch
    monkeypatch.setattr(_engine, "scratch",
                        lambda key, shape, dtype: asked.setdefault(key, shape) and real(key, shape, dtype))
    with rnnfast.backend(backend):
        got = lay(x)
    np.testing.assert_allclose(got[0], ref_stack(lay, x)[0], rtol=2e-4, atol=2e-5)
    assert asked["xg"] == (1, 96, 4 * H)        # 64 KB chunks, at least 96 rows: 24 steps of 4


_INTERRUPT_CHILD = r"""
import os, signal, sys, threading, time
# Python's own SIGINT handler even where the parent ignores SIGINT (a shell's background
# job: its children start with SIGINT ignored, and Python then installs no handler)
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
import rnnfast
backend, mode, nthr = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnnfast.set_num_threads(nthr)
layer = rnnfast.LSTM(64, 256, seed=0)
x = np.random.default_rng(0).standard_normal((40000, 8, 64)).astype(np.float32)
with rnnfast.backend(backend):
    want, _ = layer(x[:30])
    t0 = time.perf_counter()
    layer(x[:2000])
    full = (time.perf_counter() - t0) * 20
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    try:
        if mode == "train":
            y, _ = layer.forward(x[:20000], train=True)
            layer.backward(y)
        elif mode == "gemm":
            from rnnfast.kernels import cy_train
            a = np.ones((4096, 4096), np.float32)
            for _ in range(40):
                cy_train.pgemm(a, a, np.empty_like(a), 0.0, nthr)
        else:
            layer(x)
        print("not interrupted")
    except KeyboardInterrupt:
        print(f"late {time.perf_counter() - t0 - 0.3:.3f} full {full:.2f}")
    got, _ = layer(x[:30])
    print("next call", bool(np.array_equal(got, want)))
"""


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("backend,mode", [("cython", "infer"), ("cython", "train"), ("cython", "gemm"),
                                          ("numba", "infer")])   # Numba training: not yet under 0.5 s
def test_ctrl_c_stops_a_long_call(backend, mode, nthreads):
    """SIGINT during a long call (inference, training, a GEMM of training) raises
    KeyboardInterrupt within 0.5 s (the kernels ran to their end before: seconds; the
    Numba ones run in pieces of steps with Python's handlers between them), and the next
    call is right."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rnnfast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", _INTERRUPT_CHILD, backend, mode, str(nthreads)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0].startswith("late "), out.stdout
    late, full = float(lines[0].split()[1]), float(lines[0].split()[3])
    assert late < 0.5, (late, full)
    assert lines[1] == "next call True", out.stdout
