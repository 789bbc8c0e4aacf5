"""Runtime ISA dispatch (kernels/_isa.py, kernels/__init__.py) and the spill check
(tools/spill_check): each level built loads, computes what the float64 reference
computes, and says what it is; a forced level that cannot run is a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rnnfast.kernels import _isa

from conftest import require_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = _isa.built_levels()
RUNNABLE = [lv for lv in LEVELS if _isa.cpu_supports(lv)]


def _py(code: str, isa: str | None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RNNFAST_ISA"}
    if isa is not None:
        env["RNNFAST_ISA"] = isa
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_levels_built_and_best_chosen():
    assert LEVELS, "setup.py records the ISA levels it built in kernels/_built.py"
    if os.environ.get("RNNFAST_ISA"):
        pytest.skip("RNNFAST_ISA forces the level in this run")
    level, why = _isa.choose()
    assert level == RUNNABLE[-1], (level, why)     # the best level this CPU runs


@pytest.mark.parametrize("level", RUNNABLE)
def test_forced_level_loads_and_matches_reference(level):
    p = _py("""
        import json, numpy as np, rnnfast
        from rnnfast.kernels import cy_rnn, cy_train, _isa
        rng = np.random.default_rng(0)
        out = {"choice": list(_isa.choose()), "build": cy_rnn.build_info(), "errs": {}}
        for kind, cls in (("lstm", rnnfast.LSTM), ("gru", rnnfast.GRU), ("rnn", rnnfast.RNN)):
            for B in (1, 3, 8, 13):
                x = rng.standard_normal((9, B, 19)).astype(np.float32)
                layer = cls(19, 21, seed=1)
                y, _ = layer(x)
                with rnnfast.backend("reference"):
                    r, _ = layer(x.astype(np.float64))
                out["errs"][f"{kind}-{B}"] = float(abs(y - r).max())
        a = rng.standard_normal((37, 29)).astype(np.float32); b = rng.standard_normal((29, 45)).astype(np.float32)
        c = np.zeros((37, 45), np.float32)
        cy_train.pgemm(a, b, c, 0.0, 2)
        out["gemm_err"] = float(abs(c - a.astype(np.float64) @ b).max())
        print(json.dumps(out))
    """, level)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["choice"] == [level, "forced by RNNFAST_ISA"]
    assert out["build"]["level"] == level
    want_bytes = {"baseline": 16, "avx2": 32, "avx512": 64}.get(level, out["build"]["vector_bytes"])
    assert out["build"]["vector_bytes"] == want_bytes
    assert max(out["errs"].values()) < 2e-5, out["errs"]
    assert out["gemm_err"] < 1e-4


def test_bad_level_is_a_clear_error():
    p = _py("import numpy as np, rnnfast; rnnfast.LSTM(4, 4)(np.zeros((2, 1, 4), np.float32))", "avx9000")
    assert p.returncode != 0
    assert "RNNFAST_ISA='avx9000'" in p.stderr and "expected one of" in p.stderr


def test_level_the_cpu_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_isa, "_chosen", None)
    monkeypatch.setattr(_isa, "cpu_features", lambda: {"AVX2": False, "FMA3": False})
    monkeypatch.setenv("RNNFAST_ISA", "avx2")
    if "avx2" not in LEVELS:
        pytest.skip("no avx2 level in this build")
    with pytest.raises(RuntimeError, match="this CPU lacks AVX2, FMA3"):
        _isa.choose()
    monkeypatch.delenv("RNNFAST_ISA")
    monkeypatch.setattr(_isa, "_chosen", None)
    level, why = _isa.choose()          # unforced: falls back to what the CPU has
    assert level == "baseline" and "lacks" in why


def test_info_reports_level():
    p = subprocess.run([sys.executable, "-m", "rnnfast", "info", "--json", "--no-numba-trigger"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    isa = info["cython"]["isa"]
    assert isa["level"] in LEVELS and isa["reason"]
    assert info["cython"]["build"]["level"] == isa["level"]


# --- the spill check's detector, on hand-written disassembly -------------------------

sys.path.insert(0, os.path.join(ROOT, "tools", "spill_check"))
spill_check = require_oracle("spill_check")

_SPILLED = """
0000000000001000 <rf_gemm_blk_6_0_f>:
    1000:	vxorps %xmm1,%xmm1,%xmm1
    1004:	vbroadcastss (%rdx),%zmm5
    100a:	vfmadd213ps 0x80(%rsp),%zmm3,%zmm1
    1012:	vmovaps %zmm1,0x80(%rsp)
    101a:	vfmadd231ps %zmm4,%zmm5,%zmm6
    1020:	vfmadd231ps %zmm4,%zmm5,%zmm7
    1026:	vfmadd231ps %zmm4,%zmm5,%zmm8
    102c:	add    $0x4,%r8
    1030:	cmp    %rsi,%r8
    1033:	jne    1004 <rf_gemm_blk_6_0_f+0x4>
    1035:	ret
"""
_CLEAN = _SPILLED.replace("vfmadd213ps 0x80(%rsp),%zmm3,%zmm1", "vfmadd231ps %zmm3,%zmm5,%zmm1").replace(
    "vmovaps %zmm1,0x80(%rsp)", "vmovaps %zmm1,%zmm9")
# a stack tile written after the loop, and a copy loop without FMAs: not spills
_TILE = _CLEAN.replace("    1035:	ret", "    1035:	vmovaps %zmm1,0x40(%rsp)\n    103b:	ret")


def test_spill_detector():
    found = spill_check.spills(spill_check.parse(_SPILLED))
    assert len(found) == 1 and "rf_gemm_blk_6_0_f" in found[0]
    assert spill_check.spills(spill_check.parse(_CLEAN)) == []
    assert spill_check.spills(spill_check.parse(_TILE)) == []
    loops = spill_check.loops(spill_check.parse(_SPILLED)["rf_gemm_blk_6_0_f"])
    assert len(loops) == 1 and len(loops[0]) == 9      # 0x1004 .. 0x1033


def test_scalar_gate_math_call_detector():
    """The check that found 6ea1db3's bug in the built modules, run on every -march target
    too: an out-of-line call of the float gate math (a gate loop gone scalar) is reported."""
    bad = ("0000000000031f40 <rf_fused_step_v_f>:\n"
           "   3a96b:\tcall   31f00 <rf_expf>\n"
           "   3a970:\tcall   31f80 <rf_tanhf.part.0>\n")
    assert spill_check.scalar_math_calls(bad) and "2 out-of-line" in spill_check.scalar_math_calls(bad)[0]
    assert spill_check.scalar_math_calls("   3a96b:\tcall   31f00 <rf_gemm_f>\n") == []
