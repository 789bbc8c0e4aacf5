"""rnnfast.from_torch and PyTorch interoperability (torch tensors in, packed sequences)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import rnnfast

from conftest import BACKENDS, F64_TORCH_TOL, flat_states, require_oracle, rng_for, torch_run

torch = require_oracle("torch")

T, B, I, H = 6, 3, 4, 6


@pytest.mark.parametrize("cls", ["LSTM", "LSTM-proj", "GRU", "RNN-tanh", "RNN-relu"])
def test_from_torch_hyperparameters(cls):
    for L, bidir, bf, bias, dtype in itertools.product([1, 3], [False, True], [False, True], [True, False],
                                                       [torch.float32, torch.float64]):
        kw = dict(num_layers=L, bidirectional=bidir, batch_first=bf, bias=bias,
                  dropout=0.25 if L > 1 else 0.0)
        if cls.startswith("LSTM"):
            m = torch.nn.LSTM(I, H, proj_size=3 if cls == "LSTM-proj" else 0, **kw)
        elif cls == "GRU":
            m = torch.nn.GRU(I, H, **kw)
        else:
            m = torch.nn.RNN(I, H, nonlinearity=cls.split("-")[1], **kw)
        m = m.to(dtype)
        layer = rnnfast.from_torch(m)
        assert type(layer).__name__ == cls.split("-")[0]
        assert (layer.input_size, layer.hidden_size, layer.num_layers) == (I, H, L)
        assert layer.bidirectional == bidir and layer.batch_first == bf and layer.bias == bias
        assert layer.dropout == pytest.approx(kw["dropout"])
        assert layer.dtype == (np.float64 if dtype == torch.float64 else np.float32)
        if cls == "LSTM-proj":
            assert layer.proj_size == 3
        if cls.startswith("RNN"):
            assert layer.nonlinearity == cls.split("-")[1]
        if cls == "GRU":
            assert layer.linear_before_reset is True
        sd = m.state_dict()
        got = layer.state_dict()
        assert set(got) == set(sd)
        for k, v in sd.items():
            assert got[k].dtype == layer.dtype
            np.testing.assert_array_equal(got[k], v.numpy())


def test_from_torch_copies_weights():
    """The layer owns its weights: later changes to the torch module do not leak in."""
    m = torch.nn.GRU(I, H).double()
    layer = rnnfast.from_torch(m)
    before = layer.state_dict()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    for k, v in layer.parameters().items():
        assert not np.shares_memory(v, getattr(m, k).detach().numpy())


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError):
        rnnfast.from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError):
        rnnfast.from_torch(torch.nn.LSTMCell(3, 4))
    with pytest.raises(TypeError):
        rnnfast.from_torch(object())


@pytest.mark.parametrize("be", BACKENDS)
def test_torch_tensors_as_inputs(be):
    """x, hx and lengths as torch tensors (x requiring grad, on a non-contiguous view)."""
    m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2).double()
    layer = rnnfast.from_torch(m)
    rng = rng_for("tt", be)
    x = torch.from_numpy(rng.standard_normal((B, T, I))).transpose(0, 1).requires_grad_(True)
    h0 = torch.from_numpy(rng.standard_normal((4, B, 2))).requires_grad_(True)
    c0 = torch.from_numpy(rng.standard_normal((4, B, H)))
    ln = torch.tensor([6, 1, 4])
    with rnnfast.backend(be):
        y, (h, c) = layer(x, (h0, c0), ln)
    ty, (th, tc) = torch_run(m, x.detach().numpy(), (h0.detach().numpy(), c0.numpy()), ln.numpy())
    assert isinstance(y, np.ndarray) and isinstance(h, np.ndarray)
    np.testing.assert_allclose(y, ty, **F64_TORCH_TOL)
    np.testing.assert_allclose(h, th, **F64_TORCH_TOL)
    np.testing.assert_allclose(c, tc, **F64_TORCH_TOL)
    assert x.grad is None                    # nothing flowed back into torch's graph


@pytest.mark.parametrize("be", BACKENDS)
def test_packed_sequence_semantics_bidirectional_stack(be):
    """A 2-layer bidirectional GRU over unsorted lengths (1 and T included) equals torch's
    packed run, and each sequence alone (truncated to its length) gives the same rows."""
    m = torch.nn.GRU(I, H, num_layers=2, bidirectional=True).double()
    layer = rnnfast.from_torch(m)
    rng = rng_for("packed", be)
    x = rng.standard_normal((T, B, I))
    ln = np.array([2, T, 1])
    with rnnfast.backend(be):
        y, h = layer(x, None, ln)
        ty, th = torch_run(m, x, None, ln)
        np.testing.assert_allclose(y, ty, **F64_TORCH_TOL)
        np.testing.assert_allclose(h, th, **F64_TORCH_TOL)
        for b in range(B):
            yb, hb = layer(x[:ln[b], b])          # unbatched, only its valid steps
            np.testing.assert_allclose(y[:ln[b], b], yb, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(h[:, b], hb, rtol=1e-12, atol=1e-12)
            assert np.all(y[ln[b]:, b] == 0)


def test_torch_state_dict_round_trip():
    """rnnfast's state_dict loads into torch (strict) and gives the same results."""
    layer = rnnfast.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3, dtype=np.float64, seed=5)
    m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=3).double()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()}, strict=True)
    x = rng_for("rt").standard_normal((T, B, I))
    y, hn = layer(x)
    ty, th = torch_run(m, x)
    np.testing.assert_allclose(y, ty, **F64_TORCH_TOL)
    for a, e in zip(flat_states(hn), flat_states(th)):
        np.testing.assert_allclose(a, e, **F64_TORCH_TOL)
