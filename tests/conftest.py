"""Shared fixtures and helpers of the inference test suite.

The oracle is ``rnnfast.reference.run_direction`` (float64, one layer and one
direction), composed here into stacks of layers and directions independently of
``rnnfast._engine``; ``tests/test_reference.py`` anchors that oracle to PyTorch and to
the equations of SPEC.md written out by hand.
"""
from __future__ import annotations

import importlib
import os
import zlib

import numpy as np
import pytest

# The suite takes fixed step forms (rnnfast/tuning.py measures them per machine): the
# tests that force each form, and tests/test_tuning.py, cover the choice.
os.environ.setdefault("RNNFAST_TUNE", "0")

import rnnfast
from rnnfast import reference

# Every available backend; RNNFAST_TEST_BACKENDS="cython,reference" restricts the run to some
# (reported in the run's header, and refused by CI: .ci/run).
BACKENDS = rnnfast.available_backends()
if os.environ.get("RNNFAST_TEST_BACKENDS"):
    BACKENDS = [b for b in BACKENDS if b in os.environ["RNNFAST_TEST_BACKENDS"].split(",")]
FAST_BACKENDS = [b for b in BACKENDS if b != "reference"]
ALL_BACKENDS = ["auto", *BACKENDS]

# Cell variants: (id, kind, layer/functional options)
VARIANTS = [
    ("lstm", "lstm", {}),
    ("lstm-proj", "lstm", {"proj": True}),
    ("gru-lbr", "gru", {"linear_before_reset": True}),
    ("gru-nolbr", "gru", {"linear_before_reset": False}),
    ("rnn-tanh", "rnn", {"nonlinearity": "tanh"}),
    ("rnn-relu", "rnn", {"nonlinearity": "relu"}),
]
VARIANT_IDS = [v[0] for v in VARIANTS]
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
LAYER_CLS = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}

F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_TORCH_TOL = dict(rtol=1e-9, atol=1e-9)
F32_TOL = dict(rtol=1e-5, atol=1e-6)


def require_oracle(modname: str):
    """Import `modname` (an oracle such as torch, onnx, onnxruntime, or a built kernel the
    tests need). Where it is missing, the test or module is skipped as with
    ``pytest.importorskip``, except under RNNFAST_REQUIRE_ORACLES=1 (CI), where a missing
    oracle fails the run instead of letting its tests vanish."""
    if os.environ.get("RNNFAST_REQUIRE_ORACLES") == "1":
        try:
            return importlib.import_module(modname)
        except ImportError as e:
            pytest.fail(f"RNNFAST_REQUIRE_ORACLES=1 but {modname!r} does not import: "
                        f"{type(e).__name__}: {e}", pytrace=False)
    return pytest.importorskip(modname)


def pytest_report_header(config):
    """Say which backends the run covers, and whether it was narrowed."""
    lines = [(f"rnnfast backends under test: {', '.join(BACKENDS)} "
              f"(available: {', '.join(rnnfast.available_backends())})")]
    from rnnfast import backends as _backends
    broken = _backends.unavailable_backends()
    if broken:
        lines.append("rnnfast backends NOT available: "
                     + "; ".join(f"{k}: {v}" for k, v in sorted(broken.items())))
    sel = os.environ.get("RNNFAST_TEST_BACKENDS")
    if sel:
        lines.append(f"RNNFAST_TEST_BACKENDS={sel!r}: the suite is RESTRICTED to these backends")
    if os.environ.get("RNNFAST_ISA"):
        lines.append(f"RNNFAST_ISA={os.environ['RNNFAST_ISA']!r}")
    lines.append("RNNFAST_REQUIRE_ORACLES=1: missing oracles fail the run"
                 if os.environ.get("RNNFAST_REQUIRE_ORACLES") == "1"
                 else "oracles (torch, onnx, onnxruntime) are skipped where missing (RNNFAST_REQUIRE_ORACLES unset)")
    return lines


def pytest_terminal_summary(terminalreporter):
    """Repeat a backend restriction at the end, where ``-q`` runs show it too."""
    sel = os.environ.get("RNNFAST_TEST_BACKENDS")
    if sel:
        terminalreporter.write_line(f"rnnfast: RNNFAST_TEST_BACKENDS={sel!r} restricted this run to the "
                                    f"backends {BACKENDS}", yellow=True)


def tol_for(dtype) -> dict:
    return F64_TOL if np.dtype(dtype) == np.float64 else F32_TOL


@pytest.fixture(autouse=True)
def _restore_backend_and_threads():
    """Every test leaves the process-wide backend, thread count and scan tuning as it found them."""
    from rnnfast import scan
    be, nt, tune = rnnfast.get_backend(), rnnfast.get_num_threads(), dict(scan._TUNE)
    yield
    rnnfast.set_backend(be)
    rnnfast.set_num_threads(nt)
    scan._TUNE.update(tune)


@pytest.fixture
def parallel_small():
    """Run the scans' multi-threaded chunked paths even on short sequences."""
    from rnnfast import scan
    scan._TUNE.update(ls_min_steps=1, ls_min_work=1, min_steps=1)


# ---------------------------------------------------------------------------- helpers
def spy_run_layer(monkeypatch, on_call):
    """Route the engine's kernel modules through a wrapper whose ``run_layer`` first calls
    ``on_call(args, kwargs)`` (it may raise), then the real kernel."""
    from rnnfast import _engine
    real = _engine.backends.kernel_module

    class Spy:
        def __init__(self, mod):
            self._mod = mod

        def __getattr__(self, name):
            return getattr(self._mod, name)

        def run_layer(self, *a, **k):
            on_call(a, k)
            return self._mod.run_layer(*a, **k)

    monkeypatch.setattr(_engine.backends, "kernel_module", lambda name: Spy(real(name)))


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from a test's parameters (deterministic across runs and processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def layer_kwargs(kind: str, opts: dict) -> dict:
    """Constructor keyword arguments of a layer for a variant's options."""
    kw = {}
    if kind == "gru" and "linear_before_reset" in opts:
        kw["linear_before_reset"] = opts["linear_before_reset"]
    if kind == "rnn" and "nonlinearity" in opts:
        kw["nonlinearity"] = opts["nonlinearity"]
    return kw


def make_layer(kind, opts, I, H, *, num_layers=1, bidirectional=False, batch_first=False,
               bias=True, dtype=np.float64, seed=0, proj=None):
    """A layer with well-conditioned weights (U(-1/sqrt(H), 1/sqrt(H)), plus biases)."""
    kw = layer_kwargs(kind, opts)
    if kind == "lstm" and (opts.get("proj") if proj is None else proj):
        kw["proj_size"] = max(1, H // 2)
    return LAYER_CLS[kind](I, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                           bidirectional=bidirectional, dtype=dtype, seed=seed, **kw)


def ref_stack(layer, x, hx=None, lengths=None):
    """The float64 oracle for ``layer(x, hx, lengths)``, built from reference.run_direction.

    Takes and returns arrays in the layer's own conventions (batch_first, unbatched).
    """
    kind = layer._kind
    x = np.asarray(x, np.float64)
    unbatched = x.ndim == 2
    if unbatched:
        x = x[:, None]
    elif layer.batch_first:
        x = x.transpose(1, 0, 2)
    _T, B, _ = x.shape
    L, D = layer.num_layers, layer.num_directions
    H, Hout = layer.hidden_size, layer.output_size
    h0 = np.zeros((L * D, B, Hout))
    c0 = np.zeros((L * D, B, H))
    if hx is not None:
        h = hx[0] if kind == "lstm" else hx
        h0 = np.asarray(h, np.float64).reshape(L * D, B, Hout)
        if kind == "lstm":
            c0 = np.asarray(hx[1], np.float64).reshape(L * D, B, H)
    if lengths is not None:
        lengths = np.asarray(lengths).reshape(B)
    p = {k: np.asarray(v, np.float64) for k, v in layer.state_dict().items()}
    lbr = getattr(layer, "linear_before_reset", True)
    nl = getattr(layer, "nonlinearity", "tanh")
    inp = x
    hn = np.zeros((L * D, B, Hout))
    cn = np.zeros((L * D, B, H))
    for l in range(L):
        ys = []
        for d in range(D):
            sfx = f"l{l}" + ("_reverse" if d else "")
            k = l * D + d
            y, h, c = reference.run_direction(
                kind, inp, p[f"weight_ih_{sfx}"], p[f"weight_hh_{sfx}"], p.get(f"bias_ih_{sfx}"),
                p.get(f"bias_hh_{sfx}"), h0=h0[k], c0=c0[k] if kind == "lstm" else None,
                w_hr=p.get(f"weight_hr_{sfx}"), lengths=lengths, reverse=bool(d) or getattr(layer, "reverse", False),
                linear_before_reset=lbr, nonlinearity=nl, variant=getattr(layer, "_variant", None),
                w_ph=p.get(f"weight_ph_{sfx}"))
            ys.append(y)
            hn[k] = h
            if kind == "lstm":
                cn[k] = c
        inp = np.concatenate(ys, axis=-1)
    y = inp
    if unbatched:
        y, hn, cn = y[:, 0], hn[:, 0], cn[:, 0]
    elif layer.batch_first:
        y = y.transpose(1, 0, 2)
    return y, ((hn, cn) if kind == "lstm" else hn)


def random_hx(layer, B, rng, dtype=np.float64, unbatched=False, scale=0.5):
    L, D = layer.num_layers, layer.num_directions
    shp_h = (L * D, B, layer.output_size) if not unbatched else (L * D, layer.output_size)
    shp_c = (L * D, B, layer.hidden_size) if not unbatched else (L * D, layer.hidden_size)
    h = (scale * rng.standard_normal(shp_h)).astype(dtype)
    if layer._kind == "lstm":
        return (h, (scale * rng.standard_normal(shp_c)).astype(dtype))
    return h


def flat_states(hx):
    """List of state arrays of a layer result (h) or (h, c)."""
    return list(hx) if isinstance(hx, tuple) else [hx]


def assert_result_close(got, want, dtype, **tol):
    """Compare (y, hx) results: shapes equal, dtype == `dtype`, values within tolerance."""
    tol = tol or tol_for(dtype)
    gy, gh = got
    wy, wh = want
    assert np.asarray(gy).dtype == np.dtype(dtype), f"y dtype {np.asarray(gy).dtype} != {np.dtype(dtype)}"
    assert gy.shape == wy.shape, f"y shape {gy.shape} != {wy.shape}"
    np.testing.assert_allclose(gy, wy, err_msg="y", **tol)
    gs, ws = flat_states(gh), flat_states(wh)
    assert len(gs) == len(ws)
    for i, (g, w) in enumerate(zip(gs, ws)):
        assert np.asarray(g).dtype == np.dtype(dtype), f"state {i} dtype {np.asarray(g).dtype}"
        assert g.shape == w.shape, f"state {i} shape {g.shape} != {w.shape}"
        np.testing.assert_allclose(g, w, err_msg=f"state {i}", **tol)


def lengths_case(name: str, T: int, B: int) -> np.ndarray | None:
    """Named length patterns used across the suite."""
    if name == "none":
        return None
    if name == "full":
        return np.full(B, T, np.int64)
    if name == "unsorted":          # unsorted, includes a length-1 sequence and T
        base = [2, T, 1, T - 1, 3]
        return np.array([min(T, max(1, v)) for v in base[:B]], np.int64)
    if name == "with-zero":         # a length 0 sequence (rnnfast extension)
        base = [3, 0, T, 1, 0]
        return np.array([min(T, v) for v in base[:B]], np.int64)
    if name == "short":             # max length < T
        base = [T - 2, 1, T - 3, 2, T - 2]
        return np.array([max(1, min(T - 2, v)) for v in base[:B]], np.int64)
    if name == "equal":             # every sequence the same length, < T
        return np.full(B, max(1, T - 3), np.int64)
    if name == "all-zero":
        return np.zeros(B, np.int64)
    raise KeyError(name)


# ---------------------------------------------------------------------------- PyTorch peer
def torch_module(kind, opts, I, H, *, num_layers=1, bidirectional=False, batch_first=False,
                 bias=True, dtype=np.float64, seed=0):
    """A torch.nn.LSTM/GRU/RNN of the variant (PyTorch has no GRU linear_before_reset=False)."""
    torch = require_oracle("torch")
    assert opts.get("linear_before_reset", True), "PyTorch has no linear_before_reset=False GRU"
    torch.manual_seed(seed)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if kind == "lstm":
        m = torch.nn.LSTM(I, H, proj_size=max(1, H // 2) if opts.get("proj") else 0, **kw)
    elif kind == "gru":
        m = torch.nn.GRU(I, H, **kw)
    else:
        m = torch.nn.RNN(I, H, nonlinearity=opts.get("nonlinearity", "tanh"), **kw)
    m = m.double() if np.dtype(dtype) == np.float64 else m.float()
    return m.eval()


def torch_run(module, x, hx=None, lengths=None):
    """Run a torch module on numpy inputs; with `lengths`, through a packed sequence
    (enforce_sorted=False). Returns numpy (y, h) or (y, (h, c)) in the module's layout."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    dt = next(module.parameters()).dtype
    xt = torch.as_tensor(np.asarray(x)).to(dt)
    if hx is not None:
        hx = tuple(torch.as_tensor(np.asarray(s)).to(dt) for s in hx) if isinstance(hx, tuple) \
            else torch.as_tensor(np.asarray(hx)).to(dt)
    with torch.no_grad():
        if lengths is None:
            y, hn = module(xt, hx)
        else:
            T = xt.shape[1] if module.batch_first else xt.shape[0]
            p = pack_padded_sequence(xt, torch.as_tensor(np.asarray(lengths), dtype=torch.int64),
                                     batch_first=module.batch_first, enforce_sorted=False)
            yp, hn = module(p, hx)
            y = pad_packed_sequence(yp, batch_first=module.batch_first, total_length=T)[0]
    hn = tuple(s.numpy() for s in hn) if isinstance(hn, tuple) else hn.numpy()
    return y.numpy(), hn


def torch_state_dict(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
