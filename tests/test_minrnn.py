"""minGRU / minLSTM: the functional API and the layers (SPEC "Recurrences that run in
parallel over time"), against the same equations written in PyTorch (forward and
autograd), against the NumPy reference, and by finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rnnfast
from rnnfast.minrnn import MinGRU, MinLSTM
from rnnfast.scan import mingru, minlstm

BACKENDS = rnnfast.available_backends()
ALL = ["auto", *BACKENDS]
KINDS = {"mingru": (MinGRU, ("z", "h")), "minlstm": (MinLSTM, ("f", "i", "h"))}
FUNCS = {"mingru": mingru, "minlstm": minlstm}




# ---------------------------------------------------------------------------- PyTorch peer
def torch_minrnn(kind, x, params, h0=None, lengths=None, batch_first=False):
    """The SPEC's equations in PyTorch, one step after another (differentiable).

    x (T, B, I) (or (B, T, I) / unbatched (T, I)); params: dict of tensors keyed by the
    layer's names (biases optional). Returns (y, h_n) shaped like rnnfast's."""
    unbatched = x.dim() == 2
    if unbatched:
        x = x[:, None]
        h0 = None if h0 is None else h0[None]
    elif batch_first:
        x = x.transpose(0, 1)
    T, B, _ = x.shape
    H = params["weight_h"].shape[0]

    def lin(g):
        out = x @ params[f"weight_{g}"].T
        return out + params[f"bias_{g}"] if f"bias_{g}" in params else out

    if kind == "mingru":
        z = torch.sigmoid(lin("z"))
        a, b = 1 - z, z * lin("h")
    else:
        f, i = torch.sigmoid(lin("f")), torch.sigmoid(lin("i"))
        a, b = f / (f + i), i / (f + i) * lin("h")
    h = torch.zeros(B, H, dtype=x.dtype) if h0 is None else h0
    lens = torch.full((B,), T) if lengths is None else torch.as_tensor(np.asarray(lengths).reshape(B))
    ys = []
    for t in range(T):
        m = (lens > t)[:, None]
        h = torch.where(m, a[t] * h + b[t], h)
        ys.append(torch.where(m, h, torch.zeros_like(h)))
    y = torch.stack(ys) if T else torch.zeros(0, B, H, dtype=x.dtype)
    if unbatched:
        return y[:, 0], h[0]
    if batch_first:
        y = y.transpose(0, 1)
    return y, h


def make_case(kind, T, B, I, H, *, batch_first=False, unbatched=False, dtype=np.float64, seed=0,
              bias=True, scale=1.0):
    rng = np.random.default_rng([seed, T, B, I, H, int(batch_first), int(unbatched), int(bias)])
    gates = KINDS[kind][1]
    k = 1 / np.sqrt(H)
    params = {f"weight_{g}": rng.uniform(-k, k, (H, I)) * scale for g in gates}
    if bias:
        params.update({f"bias_{g}": rng.uniform(-k, k, H) for g in gates})
    if unbatched:
        x = rng.standard_normal((T, I))
        h0 = rng.standard_normal(H) * 0.5
    else:
        x = rng.standard_normal((B, T, I) if batch_first else (T, B, I))
        h0 = rng.standard_normal((B, H)) * 0.5
    params = {n: v.astype(dtype) for n, v in params.items()}
    return x.astype(dtype), params, h0.astype(dtype)


def call_functional(kind, x, params, h0=None, lengths=None, batch_first=False):
    gates = KINDS[kind][1]
    ws = [params[f"weight_{g}"] for g in gates]
    bs = [params.get(f"bias_{g}") for g in gates]
    return FUNCS[kind](x, *ws, *bs, h0=h0, lengths=lengths, batch_first=batch_first)


def torch_forward(kind, x, params, h0=None, lengths=None, batch_first=False):
    with torch.no_grad():
        y, h = torch_minrnn(kind, torch.as_tensor(x, dtype=torch.float64),
                            {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()},
                            None if h0 is None else torch.as_tensor(h0, dtype=torch.float64),
                            lengths, batch_first)
    return y.numpy(), h.numpy()


LENGTHS = {
    "none": lambda T, B: None,
    "full": lambda T, B: np.full(B, T),
    "unsorted": lambda T, B: np.array([2, T, 1, T - 1, 3][:B]).clip(0, T),
    "with-zero": lambda T, B: np.array([3, 0, T, 1, 0][:B]).clip(0, T),
    "all-zero": lambda T, B: np.zeros(B, np.int64),
    "short": lambda T, B: np.array([T - 2, 1, T - 3, 2, T - 2][:B]).clip(1, T),
}


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_against_torch(backend, kind, lengths, batch_first, parallel_small):
    T, B, I, H = 37, 5, 6, 11
    rnnfast.set_num_threads(2)
    x, params, h0 = make_case(kind, T, B, I, H, batch_first=batch_first)
    ln = LENGTHS[lengths](T, B)
    want = torch_forward(kind, x, params, h0, ln, batch_first)
    with rnnfast.backend(backend):
        got = call_functional(kind, x, params, h0, ln, batch_first)
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-9)
    if ln is not None:   # outputs past each length are exactly 0
        for bb, L in enumerate(ln):
            tail = got[0][bb, L:] if batch_first else got[0][L:, bb]
            assert not np.any(tail)
        zero = np.asarray(ln) == 0
        np.testing.assert_array_equal(got[1][zero], h0[zero])


@pytest.mark.skipif("cython" not in BACKENDS, reason="cython kernels not built")
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("lengths", ["none", "unsorted", "with-zero"])
@pytest.mark.parametrize("H,nthreads", [(64, 2), (70, 2), (100, 3), (33, 2), (200, 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_units_split_against_torch(kind, lengths, H, nthreads, dtype, parallel_small):
    """The Cython kernel's unit-split mode (each thread projects, gates and scans its own
    units over all steps; chosen for time-major inference with a panel of units per
    thread): against the PyTorch peer, with uneven unit counts and lengths."""
    T, B, I = 45, 3, 19
    rnnfast.set_num_threads(nthreads)
    x, params, h0 = make_case(kind, T, B, I, H, dtype=dtype, seed=H)
    ln = LENGTHS[lengths](T, B)
    want = torch_forward(kind, x, params, h0, ln)
    with rnnfast.backend("cython"):
        got = call_functional(kind, x, params, h0, ln)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0], want[0], **tol)
    np.testing.assert_allclose(got[1], want[1], **tol)
    if ln is not None:
        for bb, L in enumerate(ln):
            assert not np.any(got[0][L:, bb])


@pytest.mark.skipif("cython" not in BACKENDS, reason="cython kernels not built")
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_units_split_over_several_blocks(kind, parallel_small):
    """The unit-split mode carries each unit's float64 state from one block of steps to
    the next (the fused gate-scan pass): 1500 steps are three blocks of 682 here, lengths
    end inside the later blocks."""
    T, B, I, H = 1500, 3, 8, 64
    rnnfast.set_num_threads(2)
    x, params, h0 = make_case(kind, T, B, I, H, dtype=np.float32, seed=4)
    ln = np.array([1500, 700, 1400])
    want = torch_forward(kind, x, params, h0, ln)
    with rnnfast.backend("cython"):
        got = call_functional(kind, x, params, h0, ln)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
    assert not np.any(got[0][700:, 1]) and not np.any(got[0][1400:, 2])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (2, 3, 4, 5), (5, 2, 3, 8), (300, 3, 7, 13),
                                     (257, 2, 16, 33), (64, 1, 8, 4), (700, 4, 9, 24)])
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_forward_shapes_threads(backend, kind, T, B, I, H, nthreads, parallel_small):
    rnnfast.set_num_threads(nthreads)
    x, params, h0 = make_case(kind, T, B, I, H, seed=1)
    ln = np.random.default_rng(T).integers(0, T + 1, B)
    want = torch_forward(kind, x, params, h0, ln)
    with rnnfast.backend(backend):
        got = call_functional(kind, x, params, h0, ln)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_long_sequence_default_thresholds(backend, kind, batch_first):
    """Long enough for every thread to own a chunk of steps with the default tuning."""
    T, B, I, H = 1500, 3, 10, 40
    x, params, h0 = make_case(kind, T, B, I, H, batch_first=batch_first, seed=2, scale=3.0)
    ln = np.array([1500, 1000, 777])
    with rnnfast.backend("reference"):
        want = call_functional(kind, x, params, h0, ln, batch_first)
    for n in (1, 2):
        rnnfast.set_num_threads(n)
        with rnnfast.backend(backend):
            got = call_functional(kind, x, params, h0, ln, batch_first)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
def test_float32_against_float64_reference(backend, kind, parallel_small):
    T, B, I, H = 400, 3, 12, 20
    rnnfast.set_num_threads(2)
    x, params, h0 = make_case(kind, T, B, I, H, seed=3)
    ln = np.array([400, 399, 123])
    with rnnfast.backend("reference"):
        want = call_functional(kind, x, params, h0, ln)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    with rnnfast.backend(backend):
        got = call_functional(kind, x.astype(np.float32), p32, h0.astype(np.float32), ln)
        got_mixed = call_functional(kind, x, p32, h0, ln)          # float64 x, float32 weights
    for g in (got, got_mixed):
        assert g[0].dtype == np.float32 and g[1].dtype == np.float32
    want32 = call_functional(kind, x.astype(np.float32), p32, h0.astype(np.float32), ln)
    with rnnfast.backend("reference"):
        want32 = call_functional(kind, x.astype(np.float32).astype(np.float64),
                                 {k: v.astype(np.float64) for k, v in p32.items()},
                                 h0.astype(np.float32).astype(np.float64), ln)
    np.testing.assert_allclose(got[0], want32[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want32[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_mixed[0], want32[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched(backend, kind, parallel_small):
    T, I, H = 50, 4, 7
    rnnfast.set_num_threads(2)
    x, params, h0 = make_case(kind, T, 1, I, H, unbatched=True, seed=4)
    want = torch_forward(kind, x, params, h0)
    with rnnfast.backend(backend):
        y, h = call_functional(kind, x, params, h0)
        y2, h2 = call_functional(kind, x, params, h0, lengths=20, batch_first=True)   # batch_first ignored
        y3, _ = call_functional(kind, x, params, h0, lengths=[20])
    assert y.shape == (T, H) and h.shape == (H,)
    np.testing.assert_allclose(y, want[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(h, want[1], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(y2[:20], want[0][:20], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(h2, want[0][19], rtol=1e-9, atol=1e-9)
    assert not np.any(y2[20:])
    np.testing.assert_array_equal(y3, y2)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
def test_no_bias_no_h0_and_empty(backend, kind):
    x, params, _ = make_case(kind, 9, 2, 3, 4, bias=False, seed=5)
    want = torch_forward(kind, x, params)
    with rnnfast.backend(backend):
        got = call_functional(kind, x, params)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-9)
        y, h = call_functional(kind, x[:0], params, np.ones((2, 4)))
        assert y.shape == (0, 2, 4) and np.array_equal(h, np.ones((2, 4)))
        y, h = call_functional(kind, x[:, :0], params)
        assert y.shape == (9, 0, 4) and h.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_saturated_gates_stay_finite(backend, kind):
    """Pre-activations of +-1000: sigmoid saturates, nothing overflows into NaN."""
    x, params, h0 = make_case(kind, 20, 2, 3, 5, seed=6)
    params = {k: v * 2000 for k, v in params.items()}
    with rnnfast.backend(backend):
        y, h = call_functional(kind, x, params, h0)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(h))
    if kind == "mingru":      # (PyTorch's minLSTM is 0/0 where f and i both underflow)
        want = torch_forward(kind, x, params, h0)
        np.testing.assert_allclose(y, want[0], rtol=1e-9, atol=1e-9)
    with rnnfast.backend("reference"):
        want = call_functional(kind, x, params, h0)
    np.testing.assert_allclose(y, want[0], rtol=1e-9, atol=1e-9)
    with rnnfast.backend(backend):
        y32, _ = call_functional(kind, x.astype(np.float32), {k: v.astype(np.float32) for k, v in params.items()},
                                 h0.astype(np.float32))
    assert np.all(np.isfinite(y32))


# ---------------------------------------------------------------------------- errors and inputs
@pytest.mark.parametrize("kind", list(KINDS))
def test_errors(kind):
    x, params, _h0 = make_case(kind, 6, 2, 3, 4, seed=7)
    gates = KINDS[kind][1]
    f = FUNCS[kind]
    ws = [params[f"weight_{g}"] for g in gates]
    wn = [f"w_{g}" for g in gates]
    dtype_msg = r"^{}: expected a float32 or float64 array, got dtype {}$"
    with pytest.raises(TypeError, match=dtype_msg.format("x", "int64")):
        f(x.astype(np.int64), *ws)
    with pytest.raises(TypeError, match=dtype_msg.format("x", "bool")):
        f(x.astype(bool), *ws)
    with pytest.raises(TypeError, match=dtype_msg.format(wn[0], "int32")):
        f(x, ws[0].astype(np.int32), *ws[1:])
    with pytest.raises(TypeError, match=dtype_msg.format(wn[-1], "complex128")):
        f(x, *ws[:-1], ws[-1].astype(np.complex128))
    with pytest.raises(TypeError, match=dtype_msg.format("h0", "int64")):
        f(x, *ws, h0=np.ones((2, 4), np.int64))
    with pytest.raises(TypeError, match=r"^lengths: expected integers, got dtype float64$"):
        f(x, *ws, lengths=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=rf"^{wn[1]}: expected shape \(4, 3\) \(the shape of {wn[0]}\), got \(5, 3\)$"):
        f(x, ws[0], np.zeros((5, 3)), *ws[2:])
    with pytest.raises(ValueError, match=rf"^{wn[0]}: expected a 2-D \(H, I\) array, got shape \(3,\)$"):
        f(x, ws[0][0], *ws[1:])
    with pytest.raises(ValueError, match=r"b_h: expected shape \(4,\), got \(3,\)"):
        f(x, *ws, b_h=np.zeros(3))
    with pytest.raises(ValueError, match=r"^x: expected input feature size 3, got 5 \(shape \(6, 2, 5\)\)$"):
        f(np.zeros((6, 2, 5)), *ws)
    with pytest.raises(ValueError, match=r"x: expected a 2-D \(T, I\) or 3-D"):
        f(np.zeros((6, 2, 1, 3)), *ws)
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 4\), got \(3, 4\)"):
        f(x, *ws, h0=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\), got \(3,\)"):
        f(x, *ws, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match=r"^lengths: every length must be in \[0, 6\], got min 2 max 7$"):
        f(x, *ws, lengths=[7, 2])
    with pytest.raises(ValueError, match=r"^lengths: every length must be in \[0, 6\], got min -1 max 2$"):
        f(x, *ws, lengths=[-1, 2])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
def test_array_likes_and_inputs_untouched(backend, kind, parallel_small):
    rnnfast.set_num_threads(2)
    x, params, h0 = make_case(kind, 40, 3, 5, 6, seed=8)
    ln = np.array([40, 10, 0])
    want = torch_forward(kind, x, params, h0, ln)
    copies = {"x": x.copy(), "h0": h0.copy(), "ln": ln.copy(), **{k: v.copy() for k, v in params.items()}}
    with rnnfast.backend(backend):
        got = call_functional(kind, np.asfortranarray(x), {k: v.tolist() for k, v in params.items()},
                              h0.tolist(), ln.tolist())
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
        xt = torch.tensor(x, requires_grad=True)
        got = call_functional(kind, xt, {k: torch.tensor(v) for k, v in params.items()},
                              torch.tensor(h0), torch.tensor(ln))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
        ro = x.copy()
        ro.flags.writeable = False
        got = call_functional(kind, ro[:, ::1], params, h0, ln.astype(np.int32))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
        x32 = x.astype(np.float32)
        p32 = {k: v.astype(np.float32) for k, v in params.items()}
        keep = x32.copy(), {k: v.copy() for k, v in p32.items()}
        call_functional(kind, x32, p32, h0.astype(np.float32), ln)
    np.testing.assert_array_equal(x32, keep[0])
    for k in p32:
        np.testing.assert_array_equal(p32[k], keep[1][k])
    np.testing.assert_array_equal(x, copies["x"])
    np.testing.assert_array_equal(h0, copies["h0"])
    np.testing.assert_array_equal(ln, copies["ln"])
    for k, v in params.items():
        np.testing.assert_array_equal(v, copies[k])


# ---------------------------------------------------------------------------- layers
@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_parameters(kind):
    cls, gates = KINDS[kind]
    lay = cls(5, 8, seed=3)
    names = [f"weight_{g}" for g in gates] + [f"bias_{g}" for g in gates]
    assert sorted(lay.state_dict()) == sorted(names)
    k = 1 / np.sqrt(8)
    for n, v in lay.parameters().items():
        assert v.dtype == np.float32
        assert v.shape == ((8, 5) if n.startswith("weight") else (8,))
        assert np.all(np.abs(v) <= k)
    again = cls(5, 8, seed=3).state_dict()
    for n, v in lay.state_dict().items():
        np.testing.assert_array_equal(v, again[n])
    assert not np.array_equal(cls(5, 8, seed=4).state_dict()[names[0]], again[names[0]])
    nb = cls(5, 8, bias=False, dtype=np.float64)
    assert sorted(nb.state_dict()) == sorted(names[:len(gates)])
    assert nb.parameters()[names[0]].dtype == np.float64
    sd = lay.state_dict()
    sd[names[0]][...] = 0            # copies
    assert np.any(lay.parameters()[names[0]])
    with pytest.raises(TypeError):
        cls(5, 8, dtype=np.int32)
    with pytest.raises(ValueError):
        cls(0, 8)
    with pytest.raises(TypeError):
        cls(5, 8.0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_forward_matches_torch(backend, kind, batch_first, parallel_small):
    rnnfast.set_num_threads(2)
    cls, _ = KINDS[kind]
    lay = cls(6, 9, batch_first=batch_first, dtype=np.float64, seed=1)
    x, _, h0 = make_case(kind, 33, 4, 6, 9, batch_first=batch_first, seed=9)
    ln = np.array([33, 5, 0, 20])
    params = lay.state_dict()
    want = torch_forward(kind, x, params, h0, ln, batch_first)
    with rnnfast.backend(backend):
        got = lay(x, h0, ln)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-9)
        got2 = lay.forward(x, hx=h0, lengths=ln)
        np.testing.assert_array_equal(got2[0], got[0])
        # the functional API with the same weights
        got3 = call_functional(kind, x, params, h0, ln, batch_first)
        np.testing.assert_allclose(got3[0], got[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_live_parameters_and_load_state_dict(kind):
    cls, gates = KINDS[kind]
    lay = cls(4, 6, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((10, 2, 4))
    y0, _ = lay(x)
    lay.parameters()[f"weight_{gates[-1]}"] *= 2.0       # an optimiser step, in place
    y1, _ = lay(x)
    assert not np.allclose(y0, y1)
    want = torch_forward(kind, x, lay.state_dict())
    np.testing.assert_allclose(y1, want[0], rtol=1e-9, atol=1e-9)
    # load from torch tensors and lists; float32 values into a float64 layer
    other = cls(4, 6, seed=5, dtype=np.float64)
    sd = {k: torch.tensor(v) for k, v in other.state_dict().items()}
    live = lay.parameters()
    lay.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(lay.parameters()[k], v)
        assert lay.parameters()[k] is live[k]        # updated in place
    lay.load_state_dict({k: v.tolist() for k, v in other.state_dict().items()})
    before = lay.state_dict()
    bad = dict(other.state_dict())
    del bad[f"bias_{gates[0]}"]
    bad["extra"] = np.zeros(3)
    bad[f"weight_{gates[0]}"] = np.zeros((6, 5))
    with pytest.raises(ValueError) as ei:
        lay.load_state_dict(bad)
    msg = str(ei.value)
    for key in (f"bias_{gates[0]}", "extra", f"weight_{gates[0]}"):
        assert key in msg
    for k, v in before.items():          # nothing changed
        np.testing.assert_array_equal(lay.parameters()[k], v)
    with pytest.raises(TypeError):
        lay.load_state_dict({k: np.zeros(v.shape, complex) for k, v in before.items()})


@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_errors_and_backward_without_train(kind):
    cls, _ = KINDS[kind]
    lay = cls(3, 4)
    with pytest.raises(RuntimeError, match=r"^backward\(\) needs a forward\(\.\.\., train=True\) call first$"):
        lay.backward(np.zeros((2, 1, 4)))
    lay(np.zeros((2, 1, 3), np.float32))            # inference keeps nothing
    with pytest.raises(RuntimeError, match=r"^backward\(\) needs a forward\(\.\.\., train=True\) call first$"):
        lay.backward(np.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match=r"^hx: expected shape \(1, 4\), got \(2, 4\)$"):
        lay(np.zeros((2, 1, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match=r"^x: expected a float32 or float64 array, got dtype int64$"):
        lay(np.zeros((2, 1, 3), np.int64))
    with pytest.raises(ValueError, match=r"^x: expected input feature size 3, got 5 \(shape \(2, 1, 5\)\)$"):
        lay(np.zeros((2, 1, 5)))
    y, h = lay(np.zeros((2, 1, 3)))                 # float64 input, float32 layer
    assert y.dtype == np.float32 and h.dtype == np.float32


# ---------------------------------------------------------------------------- backward
def torch_grads(kind, x, params, h0, ln, batch_first, dy, dhn):
    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    pt = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    y, h = torch_minrnn(kind, xt, pt, h0t, ln, batch_first)
    loss = (y * torch.tensor(dy)).sum()
    if dhn is not None:
        loss = loss + (h * torch.tensor(dhn)).sum()
    loss.backward()
    return xt.grad.numpy(), h0t.grad.numpy(), {k: v.grad.numpy() for k, v in pt.items()}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", ["plain", "lengths", "batch_first", "unbatched", "no-dhn", "long"])
def test_backward_against_torch_autograd(backend, kind, case, parallel_small):
    rnnfast.set_num_threads(2)
    cls, _ = KINDS[kind]
    T, B, I, H = (600, 3, 5, 12) if case == "long" else (23, 4, 5, 7)
    bf = case == "batch_first"
    unb = case == "unbatched"
    lay = cls(I, H, batch_first=bf, dtype=np.float64, seed=2)
    x, _, h0 = make_case(kind, T, B, I, H, batch_first=bf, unbatched=unb, seed=10)
    ln = None
    if case in ("lengths", "batch_first", "long"):
        ln = np.array([T, 0, T // 2, 1][:B])
    rng = np.random.default_rng(11)
    with rnnfast.backend(backend):
        y, hn = lay.forward(x, h0, ln, train=True)
        dy = rng.standard_normal(y.shape)
        dhn = None if case == "no-dhn" else rng.standard_normal(hn.shape)
        dx, dh0 = lay.backward(dy, dhn)
    gx, gh0, gp = torch_grads(kind, x, lay.state_dict(), h0, ln, bf, dy, dhn)
    assert dx.shape == x.shape and dh0.shape == h0.shape
    np.testing.assert_allclose(dx, gx, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(dh0, gh0, rtol=1e-8, atol=1e-8)
    assert sorted(lay.grads) == sorted(lay.state_dict())
    for k, g in gp.items():
        assert lay.grads[k].shape == lay.state_dict()[k].shape
        np.testing.assert_allclose(lay.grads[k], g, rtol=1e-8, atol=1e-8, err_msg=k)


@pytest.mark.parametrize("kind", list(KINDS))
def test_backward_float32_and_grads_overwritten(kind, parallel_small):
    cls, _ = KINDS[kind]
    lay = cls(4, 5, seed=3)
    x = np.random.default_rng(0).standard_normal((300, 2, 4)).astype(np.float32)
    y, _hn = lay.forward(x, train=True)
    dy = np.ones_like(y)
    dx, dh0 = lay.backward(dy)
    assert dx.dtype == np.float32 and dh0.dtype == np.float32
    assert all(v.dtype == np.float32 for v in lay.grads.values())
    p64 = {k: v.astype(np.float64) for k, v in lay.state_dict().items()}
    gx, _gh0, gp = torch_grads(kind, x.astype(np.float64), p64, np.zeros((2, 5)), None, False,
                              dy.astype(np.float64), None)
    np.testing.assert_allclose(dx, gx, rtol=1e-4, atol=1e-4)
    for k in gp:
        np.testing.assert_allclose(lay.grads[k], gp[k], rtol=1e-4, atol=1e-3)
    first = {k: v.copy() for k, v in lay.grads.items()}
    lay(x)                                         # inference leaves grads alone
    for k in first:
        np.testing.assert_array_equal(lay.grads[k], first[k])
    lay.forward(x[:10], train=True)
    lay.backward(np.ones((10, 2, 5), np.float32))
    assert not np.allclose(lay.grads[f"weight_{KINDS[kind][1][0]}"], first[f"weight_{KINDS[kind][1][0]}"])
    with pytest.raises(ValueError, match=r"^dy: expected shape \(10, 2, 5\) \(the shape of y\), got \(11, 2, 5\)$"):
        lay.backward(np.ones((11, 2, 5)))


@pytest.mark.parametrize("kind", list(KINDS))
def test_backward_finite_differences_reference(kind):
    """Directional derivatives of the loss against central differences (reference backend)."""
    cls, _gates = KINDS[kind]
    T, B, I, H = 8, 3, 3, 4
    rng = np.random.default_rng(12)
    lay = cls(I, H, dtype=np.float64, seed=4)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((B, H))
    ln = np.array([8, 3, 0])
    dy = rng.standard_normal((T, B, H))
    dhn = rng.standard_normal((B, H))

    def loss(xv, hv, params):
        lay.load_state_dict(params)
        y, h = lay(xv, hv, ln)
        return float(np.sum(y * dy) + np.sum(h * dhn))

    with rnnfast.backend("reference"):
        params = lay.state_dict()
        lay.forward(x, h0, ln, train=True)
        dx, dh0 = lay.backward(dy, dhn)
        grads = {k: v.copy() for k, v in lay.grads.items()}
        eps = 1e-6
        for _ in range(3):
            vx, vh = rng.standard_normal(x.shape), rng.standard_normal(h0.shape)
            vp = {k: rng.standard_normal(v.shape) for k, v in params.items()}
            plus = loss(x + eps * vx, h0 + eps * vh, {k: params[k] + eps * vp[k] for k in params})
            minus = loss(x - eps * vx, h0 - eps * vh, {k: params[k] - eps * vp[k] for k in params})
            fd = (plus - minus) / (2 * eps)
            an = np.sum(dx * vx) + np.sum(dh0 * vh) + sum(np.sum(grads[k] * vp[k]) for k in params)
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (fd, an)


@pytest.mark.parametrize("kind", list(KINDS))
def test_backends_and_threads_agree_on_gradients(kind, parallel_small):
    cls, _ = KINDS[kind]
    x = np.random.default_rng(1).standard_normal((400, 3, 6))
    ln = np.array([400, 250, 0])
    res = []
    for be in BACKENDS:
        for n in (1, 2):
            rnnfast.set_num_threads(n)
            lay = cls(6, 10, dtype=np.float64, seed=6)
            with rnnfast.backend(be):
                y, h = lay.forward(x, None, ln, train=True)
                dx, dh = lay.backward(np.cos(y), np.sin(h))
            res.append((y, h, dx, dh, lay.grads))
    for r in res[1:]:
        for a, b in zip(r[:4], res[0][:4]):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
        for k in r[4]:
            np.testing.assert_allclose(r[4][k], res[0][4][k], rtol=1e-9, atol=1e-9)


def test_concurrent_inference_from_threads():
    import concurrent.futures as cf
    lay = MinGRU(16, 32, seed=0, dtype=np.float64)
    x = np.random.default_rng(2).standard_normal((800, 4, 16))
    with rnnfast.backend("reference"):
        want = lay(x)[0]
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: lay(x)[0], range(8)))
    for o in outs:
        np.testing.assert_allclose(o, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kind", list(KINDS))
def test_backward_empty_and_all_zero_lengths(backend, kind):
    cls, _ = KINDS[kind]
    lay = cls(3, 4, dtype=np.float64, seed=0)
    dhn = np.arange(8.0).reshape(2, 4)
    with rnnfast.backend(backend):
        y, h = lay.forward(np.zeros((0, 2, 3)), np.ones((2, 4)), train=True)
        assert y.shape == (0, 2, 4) and np.array_equal(h, np.ones((2, 4)))
        dx, dh0 = lay.backward(np.zeros((0, 2, 4)), dhn)
        assert dx.shape == (0, 2, 3)
        np.testing.assert_array_equal(dh0, dhn)
        assert all(not np.any(g) for g in lay.grads.values())
        x = np.random.default_rng(0).standard_normal((5, 2, 3))
        lay.forward(x, np.ones((2, 4)), lengths=[0, 0], train=True)
        dx, dh0 = lay.backward(np.ones((5, 2, 4)), dhn)      # outputs are constant 0: no gradient
        np.testing.assert_array_equal(dh0, dhn)
        assert not np.any(dx) and all(not np.any(g) for g in lay.grads.values())


@pytest.mark.parametrize("be", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("which", ["mingru", "minlstm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinite_preactivations_as_in_the_reference(be, which, dtype):
    """±inf and NaN inputs give the reference's values, NaN where it has NaN: sigmoid(-inf)
    is exactly 0, so z * h~ is NaN for an infinite h~ (the fast kernels clamped the
    exponent and gave ±inf), and minLSTM's f = 0 or i = 0 gives a = 0 or 1 (it gave NaN)."""
    G = 2 if which == "mingru" else 3
    vals = np.array([-np.inf, np.inf, np.nan, 0.5, -200.0, 200.0])
    x = np.array(np.meshgrid(vals, vals)).reshape(2, -1).T[None].astype(dtype)   # (1, 36, 2)
    x = np.concatenate([x, np.ones_like(x)], axis=0)                              # a second step
    rng = np.random.default_rng(3)
    ws = [rng.choice([-1.0, 1.0], (4, 2)).astype(dtype) for _ in range(G)]
    fn = getattr(rnnfast, which)
    with rnnfast.backend("reference"):
        want, hw = fn(x, *ws)
    with rnnfast.backend(be):
        got, hg = fn(x, *ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(hg, hw, rtol=1e-5, atol=1e-6, equal_nan=True)
