"""Helpers shared by the asv benchmarks.

The workloads are those of ``python -m rnnfast bench`` (``rnnfast.bench_cases.WORKLOADS``, the
standard workloads of BENCHMARKS.md), built the same way (``rnnfast.bench_cases.build_case``
and ``make_rf_fn``), so asv and the command line time the same calls.

The peers are benchmark series of their own beside rnnfast's backends (same workloads,
same weights, same 2 threads), so that one graph shows both lines: ``torch`` (PyTorch),
``onnxruntime`` (ONNX Runtime's LSTM/GRU/RNN op, one plain layer) and ``openvino``
(OpenVINO's CPU plugin in f32 on the same ONNX model); the frozen layers' low-precision
peers are ``ort8`` and ``ov16`` (LOWP_PEERS). A peer that is not installed, or has no such
model, is skipped (asv shows n/a).

``RNNFAST_ASV_SMALL=1`` in the environment shrinks every workload (T / 10, B / 4, at
least 1) for fast smoke runs; without it the standard shapes are used.

Only the workload table and the builders are imported from the installed rnnfast (the
commit under test), and the newer builders lazily, so that ``asv run`` over older commits
times what they have and skips the rest.
"""
from __future__ import annotations

import os
import tracemalloc

import numpy as np

import rnnfast
from rnnfast import bench_cases
from rnnfast.bench_cases import WORKLOADS, build_case, make_rf_fn, na_reason

BACKENDS = ["auto", "cython", "numba", "reference"]
PEERS = ["torch", "onnxruntime", "openvino"]          # fp32 peers (Inference; Training: torch)
TRAIN_PEERS = ["torch"]
# The frozen layers' low-precision peers (bench_cases.LOWP_PEERS less "ov", which is the
# "openvino" peer of Inference): ONNX Runtime's int8 LSTM, OpenVINO at its default precision.
LOWP_PEERS = ["ort8", "ov16"]
FAST_BACKENDS = ["cython", "numba"]
PRODUCT_BACKENDS = ["auto", "cython", "numba"]     # the reference is the oracle: timed, not profiled
INFERENCE = [n for n, w in WORKLOADS.items() if not w[5].get("train")]
TRAINING = [n for n, w in WORKLOADS.items() if w[5].get("train")]
THREADS = 2          # the project's standard thread count
SMALL = os.environ.get("RNNFAST_ASV_SMALL", "") not in ("", "0")


def spec(name: str) -> tuple:
    """(kind, T, B, I, H, extra) of a workload, shrunk when RNNFAST_ASV_SMALL is set."""
    kind, T, B, I, H, ex = WORKLOADS[name]
    if SMALL:
        T, B = max(2, T // 10), max(1, B // 4)
    return kind, T, B, I, H, ex


def skip(msg: str):
    """asv reports a benchmark whose setup raises NotImplementedError as skipped."""
    raise NotImplementedError(msg)


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in rnnfast.available_backends():
        skip(f"backend {backend!r} not available here")


_warmed: set = set()


PRECISIONS = ["fp32", "bf16", "int8"]     # frozen layers (layer.freeze(precision))


def make_call(name: str, backend: str, threads: int = THREADS, precision: str | None = None):
    """A zero-argument call of rnnfast's layer for workload `name` on `backend`, warmed up
    (kernels loaded, JIT compiled) by one call, once per process: this asv re-runs
    ``setup`` before every sample. The reference backend (NumPy, nothing to compile)
    is not warmed up. Features rnnfast does not have yet are skipped. With `precision`,
    the call is that of the frozen layer ``layer.freeze(precision)``."""
    if backend in PEERS:
        return make_peer_call(name, backend, threads)
    check_backend(backend)
    rnnfast.set_num_threads(threads)
    case = build_case(name, np.random.default_rng(0), have_torch=False, spec=spec(name))
    try:
        fn = make_rf_fn(case, backend, precision=precision)
        key = (name, backend, threads, precision)
        if backend != "reference" and key not in _warmed:
            fn()
            _warmed.add(key)
    except Exception as e:
        why = na_reason(e)
        if why is None:
            raise
        skip(f"{name} on {backend}: {why}")
    return fn


def numpy_alloc_peak_mb(fn) -> float:
    """Peak of NumPy-allocated memory during one call of `fn`, in MB (outputs plus
    working buffers, the projection buffer above all; NumPy reports its allocations to
    tracemalloc). Memory malloc'ed inside compiled kernels is not seen."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _peer_fn(case, peer: str, threads: int):
    if peer == "torch":
        import torch
        torch.set_num_threads(threads)
        return bench_cases.make_torch_fn(case)
    if not bench_cases.ort_supports(case):
        skip(f"{peer} runs one plain layer (not {case.name})")
    bench_cases.make_rf_layer(case)            # sets the case's weights (rnnfast's, seed 0)
    if peer == "onnxruntime":
        return bench_cases.make_ort_fn(case, threads)
    if peer == "openvino":
        peer = "ov"
    if not hasattr(bench_cases, "make_lowp_peer_fn"):
        skip(f"{peer}: this rnnfast has no bench_cases.make_lowp_peer_fn")
    return bench_cases.make_lowp_peer_fn(case, peer, threads)


def make_peer_call(name: str, peer: str, threads: int = THREADS):
    """A zero-argument call of a peer (PEERS: PyTorch, ONNX Runtime, OpenVINO f32; or
    LOWP_PEERS: ONNX Runtime's int8 LSTM, OpenVINO at its default precision) on workload
    `name`, with the same shapes, threads and (PyTorch aside) rnnfast's weights, warmed by
    one call; skipped where the peer is not installed or has no such model."""
    try:
        # PyTorch's own module (PyTorch's initialisation) for torch, rnnfast's weights else
        case = build_case(name, np.random.default_rng(0), have_torch=peer == "torch", spec=spec(name))
        fn = _peer_fn(case, peer, threads)
        fn()
    except (ImportError, NotImplementedError) as e:
        skip(f"{name} on {peer}: {type(e).__name__}: {e}")
    return fn
