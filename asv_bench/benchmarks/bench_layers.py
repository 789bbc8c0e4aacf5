"""Speed and memory of every standard workload on every backend (2 threads), training
where rnnfast has it, and thread scaling (1 vs 2 threads). The peers (PyTorch, ONNX
Runtime, OpenVINO; common.PEERS) are values of the same ``backend`` parameter, so each
workload's graph shows rnnfast's lines and the peers' side by side."""
from __future__ import annotations

import time

import rnnfast

from .common import (
    BACKENDS,
    FAST_BACKENDS,
    INFERENCE,
    LOWP_PEERS,
    PEERS,
    PRECISIONS,
    PRODUCT_BACKENDS,
    TRAIN_PEERS,
    TRAINING,
    make_call,
    make_peer_call,
    numpy_alloc_peak_mb,
)


class Inference:
    """Inference (``layer(x)``; lstm-step: 100 calls of one step, state carried), on
    rnnfast's backends and on the peers (``torch``, ``onnxruntime``, ``openvino`` in f32;
    ONNX Runtime and OpenVINO run one plain layer, n/a elsewhere)."""

    params = [INFERENCE, BACKENDS + PEERS]
    param_names = ["workload", "backend"]
    timeout = 600

    def setup(self, workload, backend):
        self.fn = make_call(workload, backend)

    def time_forward(self, workload, backend):
        self.fn()


class Frozen:
    """Inference of frozen layers (``layer.freeze(precision)``; lstm-step through
    ``frozen.stream``), beside the fp32 layers of :class:`Inference`, and the frozen
    layers' peers on the same workloads and weights (where installed), as values of the
    same parameter: ONNX Runtime's int8 LSTM (``ort8``) and OpenVINO at its default
    precision (``ov16``: bf16 on CPUs with AVX512-BF16 / AMX). OpenVINO in f32 is the
    ``openvino`` backend of :class:`Inference`."""

    params = [INFERENCE, PRECISIONS + LOWP_PEERS]
    param_names = ["workload", "precision"]
    timeout = 600

    def setup(self, workload, precision):
        if precision in LOWP_PEERS:
            self.fn = make_peer_call(workload, precision)
        else:
            self.fn = make_call(workload, "auto", precision=precision)

    def time_forward(self, workload, precision):
        self.fn()

    def peakmem_forward(self, workload, precision):
        self.fn()


class InferenceMemory:
    """Memory of inference on rnnfast's own backends."""

    params = [INFERENCE, PRODUCT_BACKENDS]
    param_names = ["workload", "backend"]
    timeout = 600

    def setup(self, workload, backend):
        self.fn = make_call(workload, backend)

    def peakmem_forward(self, workload, backend):
        """Peak RSS of the process (inputs, weights and the warm-up call included)."""
        self.fn()

    def track_numpy_alloc_peak(self, workload, backend):
        return numpy_alloc_peak_mb(self.fn)

    track_numpy_alloc_peak.unit = "MB"


class Training:
    """Forward (train=True) + backward of sum(y * dy), dy = 1, on rnnfast's backends and
    PyTorch's autograd (``torch``); skipped while rnnfast has no training for the
    workload's cell."""

    params = [TRAINING, BACKENDS + TRAIN_PEERS]
    param_names = ["workload", "backend"]
    timeout = 600

    def setup(self, workload, backend):
        self.fn = make_call(workload, backend)

    def time_forward_backward(self, workload, backend):
        self.fn()


class TrainingMemory:
    """Memory of training on rnnfast's own backends."""

    params = [TRAINING, PRODUCT_BACKENDS]
    param_names = ["workload", "backend"]
    timeout = 600

    def setup(self, workload, backend):
        self.fn = make_call(workload, backend)

    def peakmem_forward_backward(self, workload, backend):
        self.fn()

    def track_numpy_alloc_peak(self, workload, backend):
        return numpy_alloc_peak_mb(self.fn)

    track_numpy_alloc_peak.unit = "MB"


SCALING = ["lstm-b1", "lstm-b8", "lstm-b64", "gru-b64", "rnn-b64"]


class ThreadScaling:
    """The same call on 1 and 2 threads (BENCHMARKS.md: >= 1.8x at B >= 8)."""

    params = [SCALING, [1, 2], FAST_BACKENDS]
    param_names = ["workload", "threads", "backend"]
    timeout = 300

    def setup(self, workload, threads, backend):
        self.fn = make_call(workload, backend, threads=threads)

    def time_forward(self, workload, threads, backend):
        self.fn()


class ThreadSpeedup:
    """Two-thread speedup over one thread measured side by side in one process
    (alternating, best of 5 each), which the noisy shared machine needs."""

    params = [SCALING, FAST_BACKENDS]
    param_names = ["workload", "backend"]
    timeout = 300

    def setup(self, workload, backend):
        self.fn = make_call(workload, backend, threads=2)
        rnnfast.set_num_threads(1)
        self.fn()                      # warm the one-thread path too

    def track_two_thread_speedup(self, workload, backend):
        best = {1: float("inf"), 2: float("inf")}
        for _ in range(5):
            for n in (1, 2):
                rnnfast.set_num_threads(n)
                time.sleep(0.05)
                t0 = time.perf_counter()
                self.fn()
                best[n] = min(best[n], time.perf_counter() - t0)
        rnnfast.set_num_threads(2)
        return best[1] / best[2]

    track_two_thread_speedup.unit = "x"
