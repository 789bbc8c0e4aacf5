"""Host-measured step forms (rnnfast/tuning.py): measured once, cached per machine, read
back without measuring, off with RNNFAST_TUNE=0, honoured by the engine, redone by
``python -m rnnfast tune``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnfast
from rnnfast import _engine, backends, tuning


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("RNNFAST_TUNE", "1")
    monkeypatch.setattr(tuning, "_profiles", {})
    return tmp_path


def test_measured_once_then_read_from_cache(fresh, monkeypatch):
    n = rnnfast.get_num_threads()
    p = tuning.profile(n)
    assert set(tuning.DEFAULTS) <= set(p) and p["source"] == "measured"
    for k in tuning.DEFAULTS:
        assert p[k] in (tuning.DEFAULTS[k], tuning.ON_VALUES[k])
    assert p["seconds"] < 5
    with open(tuning.cache_path()) as fh:
        cached = json.load(fh)
    assert cached[tuning.machine_key(n)]["rec_rowdot_rows"] == p["rec_rowdot_rows"]
    # a new process (no profiles in memory) reads it back and measures nothing
    monkeypatch.setattr(tuning, "_profiles", {})
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert tuning.profile(n) == cached[tuning.machine_key(n)]


def test_disabled_takes_defaults_and_writes_nothing(fresh, monkeypatch):
    monkeypatch.setenv("RNNFAST_TUNE", "0")
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured while disabled"))
    assert tuning.profile(2) == tuning.DEFAULTS
    x = np.random.default_rng(0).standard_normal((5, 3, 8)).astype(np.float32)
    rnnfast.LSTM(8, 8, seed=0)(x)
    assert not os.path.exists(tuning.cache_path())


@pytest.mark.parametrize("forms", [{"bsplit_max_wbytes": 1280 << 10, "rec_rowdot_rows": 0},
                                   {"bsplit_max_wbytes": 0, "rec_rowdot_rows": 2},
                                   {"bsplit_max_wbytes": 0, "rec_rowdot_rows": 0}])
def test_engine_takes_the_profile(fresh, monkeypatch, forms):
    if "cython" not in rnnfast.available_backends():
        pytest.skip("the step forms are the Cython kernel's")
    monkeypatch.setattr(_engine, "_BSPLIT_MAX_WBYTES", None)
    monkeypatch.setattr(_engine, "_REC_ROWDOT_ROWS", None)
    rnnfast.set_num_threads(2)
    monkeypatch.setattr(tuning, "_profiles", {2: forms})
    mod = backends.kernel_module("cython")
    seen = []
    real = mod.run_layer

    def spy(*a, **k):
        seen.append((k.get("batch_split"), k.get("rec_rowdot")))
        return real(*a, **k)
    monkeypatch.setattr(mod, "run_layer", spy)
    rng = np.random.default_rng(1)
    for B in (2, 8):
        layer = rnnfast.LSTM(32, 32, seed=2)
        x = rng.standard_normal((12, B, 32)).astype(np.float32)
        with rnnfast.backend("cython"):
            y, _ = layer(x)
        with rnnfast.backend("reference"):
            r, _ = layer(x.astype(np.float64))
        np.testing.assert_allclose(y, r, rtol=1e-4, atol=1e-5)
    assert seen[0][1] == (forms["rec_rowdot_rows"] >= 2)          # B=2
    assert seen[1][0] == (forms["bsplit_max_wbytes"] > 0)         # B=8 on 2 threads


def test_tune_cli(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "RNNFAST_TUNE": "1"}
    p = subprocess.run([sys.executable, "-m", "rnnfast", "tune", "--threads", "1,2"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "threads 1:" in p.stdout and "threads 2:" in p.stdout
    with open(os.path.join(tmp_path, "rnnfast", "tune.json")) as fh:
        assert len(json.load(fh)) == 2
    p = subprocess.run([sys.executable, "-m", "rnnfast", "tune"], capture_output=True, text=True,
                       env={**env, "RNNFAST_TUNE": "0"}, timeout=300)
    assert p.returncode == 2 and "RNNFAST_TUNE=0" in p.stderr
