"""The standard workloads of ``python -m rnnfast bench`` (the referee's table: same
names, shapes and FLOP counts) and how each library runs them: rnnfast (a layer or the
functional API, any backend), PyTorch, ONNX Runtime; and the correctness check every
library passes before it is timed (:func:`check_result`, against PyTorch or rnnfast's
float64 reference). The asv suite builds its cases here too. PyTorch and ONNX Runtime
are imported lazily, only by the functions that need them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# name: (kind, T, B, I, H, extra) -- identical to the referee's WORKLOADS
WORKLOADS: dict[str, tuple] = {
    "lstm-b1":        ("lstm", 100, 1, 256, 256, {}),
    "lstm-b8":        ("lstm", 100, 8, 256, 256, {}),
    "lstm-b64":       ("lstm", 100, 64, 512, 512, {}),
    "gru-b1":         ("gru", 100, 1, 256, 256, {}),
    "gru-b64":        ("gru", 100, 64, 512, 512, {}),
    "rnn-b64":        ("rnn", 100, 64, 512, 512, {}),
    "lstm-2l-bidir":  ("lstm", 500, 16, 256, 256, {"num_layers": 2, "bidirectional": True}),
    "lstm-varlen":    ("lstm", 500, 16, 256, 256, {"varlen": True}),
    "lstm-step":      ("lstm", 100, 1, 256, 256, {"stream": True}),
    "lstm-train-b8":  ("lstm", 100, 8, 256, 256, {"train": True}),
    "lstm-train-b64": ("lstm", 100, 64, 512, 512, {"train": True}),
    "gru-train-b64":  ("gru", 100, 64, 512, 512, {"train": True}),
    "mingru-long":    ("mingru", 4096, 4, 256, 256, {}),
}
G = {"lstm": 4, "gru": 3, "rnn": 1, "mingru": 2}

TOLERANCE = 1e-3            # max error (see max_err) accepted before timing


# ----------------------------------------------------------------------------- workloads
def flops(kind, T, B, I, H, ex, steps=None) -> int:
    """Useful FLOPs; `steps` = sum of lengths when sequences are of different lengths."""
    L = ex.get("num_layers", 1)
    D = 2 if ex.get("bidirectional") else 1
    TB = steps if steps is not None else T * B
    f = 2 * TB * G[kind] * H * (I + (H if kind != "mingru" else 0)) * D
    if L > 1:
        f += (L - 1) * 2 * TB * G[kind] * H * (D * H + H) * D
    return f * (3 if ex.get("train") else 1)


class TorchMinGRU:
    """minGRU exactly as SPEC.md defines it, in PyTorch (the referee's peer): the
    projections are one GEMM each and the recurrence a loop over time."""

    def __init__(self, I, H):
        import torch
        self.torch = torch
        self.z = torch.nn.Linear(I, H)
        self.h = torch.nn.Linear(I, H)

    def state_dict(self):
        return {"weight_z": self.z.weight, "bias_z": self.z.bias, "weight_h": self.h.weight, "bias_h": self.h.bias}

    def __call__(self, x):
        torch = self.torch
        z = torch.sigmoid(self.z(x))
        ht = self.h(x)
        h = torch.zeros_like(ht[0])
        out = torch.empty_like(ht)
        for t in range(x.shape[0]):
            h = torch.lerp(h, ht[t], z[t])
            out[t] = h
        return out, h


def make_torch(kind, I, H, ex):
    """The PyTorch module of a workload (seeded as the referee does)."""
    import torch
    torch.manual_seed(0)
    if kind == "mingru":
        return TorchMinGRU(I, H)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    return cls(I, H, num_layers=ex.get("num_layers", 1), bidirectional=ex.get("bidirectional", False))


def make_ort(kind, T, B, I, H, sd, threads, stream=False):
    """Single-layer unidirectional ONNX Runtime session carrying the weights `sd` (PyTorch
    names, numpy arrays); with `stream`, an LSTM of one step taking and returning (h, c)."""
    return ort_session(onnx_model(kind, T, B, I, H, sd, stream), threads)


def ort_session(model: bytes, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def onnx_model(kind, T, B, I, H, sd, stream=False) -> bytes:
    """The ONNX model (bytes) of make_ort: one LSTM/GRU/RNN node with inputs X, seq (or X,
    h0, c0 with `stream`)."""
    from onnx import TensorProto, helper, numpy_helper
    w, r, bi, bh = sd["weight_ih_l0"], sd["weight_hh_l0"], sd["bias_ih_l0"], sd["bias_hh_l0"]
    if kind == "lstm":   # torch i,f,g,o -> onnx i,o,f,c
        def perm(a):
            return np.concatenate([a[0:H], a[3 * H:4 * H], a[H:2 * H], a[2 * H:3 * H]])
    elif kind == "gru":  # torch r,z,n -> onnx z,r,h
        def perm(a):
            return np.concatenate([a[H:2 * H], a[0:H], a[2 * H:3 * H]])
    else:
        def perm(a):
            return a
    W = numpy_helper.from_array(perm(w)[None].astype(np.float32), "W")
    R = numpy_helper.from_array(perm(r)[None].astype(np.float32), "R")
    Bb = numpy_helper.from_array(np.concatenate([perm(bi), perm(bh)])[None].astype(np.float32), "B")
    attrs = {"hidden_size": H}
    if kind == "gru":
        attrs["linear_before_reset"] = 1
    op = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[kind]

    def f32(n, shape):
        return helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
    if stream:
        node = helper.make_node(op, ["X", "W", "R", "B", "", "h0", "c0"], ["", "Y_h", "Y_c"], **attrs)
        ins = [f32("X", [1, B, I]), f32("h0", [1, B, H]), f32("c0", [1, B, H])]
        outs = [f32("Y_h", None), f32("Y_c", None)]
    else:
        node = helper.make_node(op, ["X", "W", "R", "B", "seq"], ["Y"], **attrs)
        ins = [f32("X", [T, B, I]), helper.make_tensor_value_info("seq", TensorProto.INT32, [B])]
        outs = [f32("Y", None)]
    g = helper.make_graph([node], "g", ins, outs, [W, R, Bb])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


# Peers of the frozen layers (bench --precision): ONNX Runtime's dynamic int8 LSTM
# (DynamicQuantizeLSTM) and OpenVINO's CPU plugin in f32 and at its default precision (bf16
# on CPUs with AVX512-BF16 / AMX), on the same ONNX model as the ort peer.
LOWP_PEERS = ("ort8", "ov", "ov16")
# max error of a peer against the oracle (the SPEC's bounds for its precision)
PEER_TOLERANCE = {"ort8": 2e-2, "ov16": 1e-2}


def _ort_int8(model: bytes) -> bytes:
    """`model` through ONNX Runtime's quantize_dynamic (int8 weights): LSTM nodes become
    DynamicQuantizeLSTM. Its advice to pre-process is logged at WARNING on the root logger:
    silenced for the call only."""
    import logging
    import os
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "m.onnx"), os.path.join(d, "q.onnx")
        with open(src, "wb") as fh:
            fh.write(model)
        level = logging.root.level
        logging.root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            logging.root.setLevel(level)
        with open(dst, "rb") as fh:
            return fh.read()


def _ov_request(model: bytes, threads: int, f32: bool):
    import os
    import tempfile

    import openvino as ov
    core = ov.Core()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        with open(path, "wb") as fh:
            fh.write(model)
        cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if f32:
            cfg["INFERENCE_PRECISION_HINT"] = "f32"
        return core.compile_model(core.read_model(path), "CPU", cfg).create_infer_request()


def make_lowp_peer_fn(case: Case, peer: str, threads: int) -> Callable:
    """A call of peer `peer` (LOWP_PEERS) on `case`, returning what make_ort_fn returns.
    NotImplementedError where the peer has no such model (ONNX Runtime has no int8 GRU or
    RNN), ImportError where it is not installed."""
    model = onnx_model(case.kind, case.T, case.B, case.I, case.H, case.sd, case.stream)
    x, T, B, H = case.x, case.T, case.B, case.H
    seq = case.lengths.astype(np.int32)
    if peer == "ort8":
        if case.kind != "lstm":
            raise NotImplementedError(f"ONNX Runtime has no int8 {case.kind.upper()} (DynamicQuantizeLSTM only)")
        sess = ort_session(_ort_int8(model), threads)
        if case.stream:
            def run_ort8_stream():
                h = c = np.zeros((1, B, H), np.float32)
                for t in range(T):
                    h, c = sess.run(None, {"X": x[t:t + 1], "h0": h, "c0": c})
                return h[0]
            return run_ort8_stream
        return lambda: sess.run(None, {"X": x, "seq": seq})[0][:, 0]
    req = _ov_request(model, threads, f32=peer == "ov")
    if case.stream:
        def run_ov_stream():
            h = c = np.zeros((1, B, H), np.float32)
            for t in range(T):
                req.infer({"X": x[t:t + 1], "h0": h, "c0": c})
                h = req.get_output_tensor(0).data.copy()
                c = req.get_output_tensor(1).data.copy()
            return h[0]
        return run_ov_stream

    def run_ov():
        req.infer({"X": x, "seq": seq})
        return req.get_output_tensor(0).data[:, 0].copy()
    return run_ov


# ----------------------------------------------------------------------------- correctness
def max_err(a, b) -> float:
    """Largest absolute difference of `a` from the oracle `b`, relative to the oracle's
    scale when that exceeds 1 (weight gradients sum over T*B rows and reach the hundreds).
    NaN anywhere gives NaN; a shape mismatch raises ``ValueError``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} vs {b.shape}")
    if not a.size:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
        return float("nan")
    return float(np.max(np.abs(a64 - b64)) / max(1.0, float(np.max(np.abs(b64)))))


def compare(got, want) -> float:
    """Max error of a result against the oracle's; results are arrays or lists of arrays
    (training: dx then the weight gradients), compared element by element."""
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            n = len(got) if isinstance(got, (list, tuple)) else "an array"
            raise ValueError(f"expected {len(want)} arrays, got {n}")
        return max((max_err(g, w) for g, w in zip(got, want)), default=0.0)
    return max_err(got, want)


def check_result(got, want, tol: float = TOLERANCE) -> tuple[bool, float, str]:
    """``(ok, error, message)``: ok when the error is within `tol` (NaN is never ok)."""
    try:
        e = compare(got, want)
    except ValueError as ex:
        return False, float("nan"), f"WRONG: {ex}"
    if e <= tol:          # False for NaN
        return True, e, ""
    return False, e, f"WRONG: max error vs oracle {e:.3g} > {tol:g}"


# ----------------------------------------------------------------------------- building
def na_reason(exc: BaseException) -> str | None:
    """The "n/a" reason when `exc` means a feature rnnfast does not have yet, else None."""
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (NotImplementedError, ImportError)):
        return msg
    if isinstance(exc, AttributeError) and "rnnfast" in str(exc):
        return msg
    return None


def _short(s: str, n: int = 110) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass
class Case:
    name: str
    kind: str
    T: int
    B: int
    I: int
    H: int
    ex: dict
    x: np.ndarray
    lengths: np.ndarray
    sd: dict            # numpy state dict (PyTorch names)
    tmod: object        # torch module or None
    work: int

    @property
    def train(self) -> bool:
        return bool(self.ex.get("train"))

    @property
    def stream(self) -> bool:
        return bool(self.ex.get("stream"))

    @property
    def varlen(self) -> bool:
        return bool(self.ex.get("varlen"))


def build_case(name: str, rng: np.random.Generator, have_torch: bool, spec: tuple | None = None) -> Case:
    """Inputs and weights of one workload (PyTorch's initialisation when it is installed,
    else rnnfast's own, seed 0); `spec` replaces the workload's (kind, T, B, I, H, extra)."""
    kind, T, B, I, H, ex = spec if spec is not None else WORKLOADS[name]
    tmod, sd = None, None
    if have_torch:
        tmod = make_torch(kind, I, H, ex)
        sd = {k: v.detach().numpy() for k, v in tmod.state_dict().items()}
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = np.full(B, T, np.int64)
    if ex.get("varlen"):
        lengths = rng.integers(T // 2, T + 1, B)
        lengths[0] = T
    steps = int(lengths.sum()) if ex.get("varlen") else None
    return Case(name, kind, T, B, I, H, ex, x, lengths, sd, tmod, flops(kind, T, B, I, H, ex, steps))


def make_rf_layer(case: Case):
    """rnnfast's layer for a workload, carrying the case's weights (sets case.sd when
    PyTorch did not provide them)."""
    import rnnfast as rf
    if case.kind == "mingru":
        if not hasattr(rf, "MinGRU"):
            raise NotImplementedError("rnnfast.MinGRU is not implemented yet")
        lay = rf.MinGRU(case.I, case.H, seed=0)
    else:
        cls = {"lstm": rf.LSTM, "gru": rf.GRU, "rnn": rf.RNN}[case.kind]
        lay = cls(case.I, case.H, num_layers=case.ex.get("num_layers", 1),
                  bidirectional=case.ex.get("bidirectional", False), seed=0)
    if case.sd is None:
        case.sd = lay.state_dict()
    else:
        lay.load_state_dict(case.sd)
    return lay


def make_rf_fn(case: Case, backend_name: str, precision: str | None = None) -> Callable:
    """A call of rnnfast's layer on backend `backend_name` returning what is compared;
    with `precision`, of the frozen layer ``layer.freeze(precision)`` (streams through
    ``frozen.stream``; training workloads are n/a)."""
    import rnnfast as rf
    lay = make_rf_layer(case)
    if precision is not None:
        if case.train:
            raise NotImplementedError("a frozen layer is inference-only (training workload)")
        lay = lay.freeze(precision)
        if case.stream:
            x, T, B = case.x, case.T, case.B

            def run_stream():
                st = lay.stream(batch=B)
                for t in range(T):
                    st(x[t])
                return np.asarray(st.state[0])[0]
            return run_stream
    x, T = case.x, case.T
    ln = case.lengths if case.varlen else None
    keys = sorted(case.sd)
    is_ref = backend_name == "reference"

    def scope():
        if not is_ref:
            return rf.backend(backend_name)
        # The reference backend is NumPy only: its BLAS runs on the requested count
        from rnnfast import threads as _thr
        stack = contextlib.ExitStack()
        stack.enter_context(rf.backend(backend_name))
        stack.enter_context(_thr.blas_threads(rf.get_num_threads()))
        return stack

    if case.stream:
        def run():
            with scope():
                hx = None
                for t in range(T):
                    _, hx = lay(x[t:t + 1], hx)
            return np.asarray(hx[0])[0]
    elif case.train:
        dy_box = []

        def run():
            with scope():
                y, _ = lay.forward(x, train=True)
                if not dy_box:
                    dy_box.append(np.ones_like(y))
                dx, _ = lay.backward(dy_box[0])
            return [dx] + [lay.grads[k] for k in keys]
    else:
        def run():
            with scope():
                return lay(x, lengths=ln)[0]
    return run


def make_torch_fn(case: Case) -> Callable:
    import torch
    tmod, T, B, H = case.tmod, case.T, case.B, case.H
    xt = torch.from_numpy(case.x)
    if case.stream:   # T calls of one step each, state carried: LSTMCell
        cell = torch.nn.LSTMCell(case.I, H)
        cell.load_state_dict({k[:-3]: v for k, v in tmod.state_dict().items()})

        def run():
            h = (torch.zeros(B, H), torch.zeros(B, H))
            with torch.no_grad():
                for t in range(T):
                    h = cell(xt[t], h)
            return h[0].numpy()
    elif case.varlen:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        lt = torch.from_numpy(case.lengths)

        def run():
            p = pack_padded_sequence(xt, lt, enforce_sorted=False)
            with torch.no_grad():
                y, _ = tmod(p)
            return pad_packed_sequence(y, total_length=T)[0].numpy()
    elif case.train:
        keys = sorted(case.sd)

        def run():
            for p in tmod.parameters():
                p.grad = None
            xx = xt.clone().requires_grad_(True)
            y, _ = tmod(xx)
            y.backward(torch.ones_like(y))
            return [xx.grad.numpy()] + [tmod.get_parameter(k).grad.numpy() for k in keys]
    else:
        def run():
            with torch.no_grad():
                return tmod(xt)[0].numpy()
    return run


def make_ort_fn(case: Case, threads: int) -> Callable:
    sess = make_ort(case.kind, case.T, case.B, case.I, case.H, case.sd, threads, case.stream)
    x, T, B, H = case.x, case.T, case.B, case.H
    if case.stream:
        def run():
            h = c = np.zeros((1, B, H), np.float32)
            for t in range(T):
                h, c = sess.run(None, {"X": x[t:t + 1], "h0": h, "c0": c})
            return h[0]
        return run
    seq = case.lengths.astype(np.int32)
    return lambda: sess.run(None, {"X": x, "seq": seq})[0][:, 0]


def ort_supports(case: Case) -> bool:
    """ONNX Runtime's RNN ops cover one plain layer (the referee's ORT peers)."""
    ex = case.ex
    return not (case.train or case.kind == "mingru" or ex.get("num_layers", 1) > 1 or ex.get("bidirectional"))
