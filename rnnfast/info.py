"""``python -m rnnfast info``: what this installation runs on.

Version, backends and what "auto" picks, thread counts, Numba's threading layer, whether
the Cython kernels have OpenMP, the BLAS libraries loaded, the CPU and its SIMD features,
and the versions of the libraries rnnfast depends on. Nothing here needs PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

# SIMD features worth knowing for the kernels (x86 flag names of /proc/cpuinfo, and ARM's)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
              "neon", "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm")

# representative calls for the "auto" table: (label, kind, batch, hidden)
AUTO_CASES = (("lstm B=1 H=256", "lstm", 1, 256), ("lstm B=64 H=512", "lstm", 64, 512),
              ("gru B=1 H=256", "gru", 1, 256), ("gru B=64 H=512", "gru", 64, 512),
              ("rnn B=64 H=512", "rnn", 64, 512))

ENV_PREFIXES = ("RNNFAST_", "OPENBLAS_", "OMP_", "MKL_", "NUMBA_", "GOMP_", "KMP_")
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
              "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_info() -> dict:
    """CPU model, logical CPU count and SIMD features (from /proc/cpuinfo on Linux, else
    from NumPy's runtime CPU detection)."""
    out = {"machine": platform.machine(), "model": None, "logical_cpus": os.cpu_count(), "simd": [],
           "simd_source": None}
    if hasattr(os, "sched_getaffinity"):
        out["usable_cpus"] = len(os.sched_getaffinity(0))
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and not out["model"]:
                    out["model"] = val.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    if flags:
        out["simd"] = [f for f in SIMD_FLAGS if f in flags]
        out["simd_source"] = "/proc/cpuinfo"
    else:
        from .kernels._isa import cpu_features
        feats = cpu_features()
        if feats:
            out["simd"] = [f for f, on in feats.items() if on]
            out["simd_source"] = "numpy"
    if not out["model"]:
        out["model"] = platform.processor() or None
    return out


def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


def _numba_threading(trigger: bool, backends: list[str]) -> dict:
    """Numba's threading layer; only initialised (by a tiny call of rnnfast's Numba backend,
    else a tiny parallel loop) when the Numba backend is usable and `trigger` is set."""
    out: dict = {"version": _version("numba"), "layer": None, "note": ""}
    if "numba" not in backends:
        out["note"] = "numba backend not available"
        return out
    try:
        import numba
        out["num_threads"] = numba.config.NUMBA_NUM_THREADS
        out["configured_layer"] = numba.config.THREADING_LAYER
    except Exception as e:  # noqa: BLE001
        out["note"] = f"numba import failed: {type(e).__name__}: {e}"
        return out
    try:
        from . import backends as _b
        _b.kernel_module("numba")
    except Exception as e:  # noqa: BLE001
        out["note"] = f"numba backend not usable ({type(e).__name__}: {e})"
        return out
    if not trigger:
        out["note"] = "not initialised (no parallel call made)"
        return out
    import rnnfast as rf
    try:
        with rf.backend("numba"):
            x = np.zeros((3, 2, 4), np.float32)
            rf.LSTM(4, 4, seed=0)(x)
    except Exception as e:  # noqa: BLE001
        out["note"] = f"tiny numba-backend call failed ({type(e).__name__}: {e})"
    try:
        out["layer"] = numba.threading_layer()
    except ValueError:          # the kernels made no parallel launch at this size
        try:
            from numba import njit, prange

            @njit(parallel=True)
            def _tiny(a):
                s = 0.0
                for i in prange(a.shape[0]):
                    s += a[i]
                return s
            _tiny(np.ones(64))
            out["layer"] = numba.threading_layer()
        except Exception as e:  # noqa: BLE001
            out["note"] = f"threading layer not initialised ({type(e).__name__}: {e})"
    return out


def compiler_native_target(cc: str | None = None) -> str | None:
    """What ``gcc -march=native`` takes this CPU for (e.g. 'rocketlake' for a KVM guest of a
    Sapphire Rapids Xeon), or None without a GCC-compatible compiler."""
    import shutil
    import subprocess
    cc = cc or os.environ.get("CC", "gcc").split()[0]
    if shutil.which(cc) is None:
        return None
    try:
        p = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-march=":
            return parts[1]
    return None


def isa_info() -> dict:
    """The kernels' ISA level in use and why, the levels built and their flags."""
    from .kernels import _isa
    out: dict = {"levels_built": _isa.built_levels(), "flags": _isa.built_flags(), "level": None,
                 "reason": None, "forced": os.environ.get("RNNFAST_ISA") or None}
    try:
        out["level"], out["reason"] = _isa.choose()
    except RuntimeError as e:
        out["reason"] = f"error: {e}"
    out["cpu_supports"] = {lv: _isa.cpu_supports(lv) for lv in _isa.LEVEL_ORDER}
    return out


def _tuning_info(nthreads: int) -> dict:
    from . import tuning
    out = {"enabled": tuning.enabled(), "cache": tuning.cache_path()}
    if out["enabled"]:
        try:
            out["profile"] = tuning.profile(nthreads)
        except Exception as e:  # noqa: BLE001
            out["error"] = f"{type(e).__name__}: {e}"
    return out


def _cython_info() -> dict:
    out = {"importable": False, "openmp": None, "path": None, "note": ""}
    try:
        out["isa"] = isa_info()
    except Exception as e:  # noqa: BLE001
        out["isa"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        from .kernels import cy_rnn
        out["importable"] = True
        out["path"] = getattr(cy_rnn, "__file__", None)
        out["openmp"] = bool(cy_rnn.have_openmp())
        out["build"] = cy_rnn.build_info()
    except Exception as e:  # noqa: BLE001
        out["note"] = f"{type(e).__name__}: {e}"
    return out


def _frozen_info() -> dict:
    """The kernels frozen bf16 / int8 layers run here (rnnfast/_lowp.py)."""
    try:
        from . import _lowp
        return {p: _lowp.isa(p)[1] for p in ("bf16", "int8")}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def collect(trigger_numba: bool = True) -> dict:
    """Everything ``info`` reports, as a dict."""
    import rnnfast as rf

    from . import backends as _b
    from . import threads as _t
    avail = rf.available_backends()
    auto = {}
    with rf.backend("auto"):
        for label, kind, B, H in AUTO_CASES:
            try:
                auto[label] = _b.resolve(kind, B, H, np.dtype(np.float32), rf.get_num_threads())
            except Exception as e:  # noqa: BLE001
                auto[label] = f"? ({type(e).__name__}: {e})"
    try:
        blas = _t.blas_info()
    except Exception as e:  # noqa: BLE001
        blas = [{"error": f"{type(e).__name__}: {e}"}]
    info = {
        "rnnfast": {"version": rf.__version__, "path": os.path.dirname(rf.__file__)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable, "platform": platform.platform()},
        "backends": {"available": avail, "selected": rf.get_backend(), "auto": auto,
                     "unavailable": _b.unavailable_backends()},
        "threads": {"rnnfast": rf.get_num_threads(), "cpu_count": os.cpu_count(),
                    "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}},
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "memory": rf.memory_info(),
        "cython": _cython_info(),
        "tuning": _tuning_info(rf.get_num_threads()),
        "frozen": _frozen_info(),
        "numba": _numba_threading(trigger_numba, avail),
        "blas": blas,
        "cpu": {**cpu_info(), "native_target": compiler_native_target()},
        "versions": {d: _version(d) for d in ("numpy", "scipy", "numba", "llvmlite", "threadpoolctl", "Cython",
                                             "torch", "onnxruntime")},
    }
    return info


def format_info(info: dict) -> str:
    lines = []
    r, p, b, t = info["rnnfast"], info["python"], info["backends"], info["threads"]
    lines.append(f"rnnfast {r['version']}  ({r['path']})")
    lines.append(f"python {p['version']} {p['implementation']}  {p['platform']}")
    lines.append(f"backends: available {', '.join(b['available'])}; selected {b['selected']!r}")
    for name, why in b.get("unavailable", {}).items():
        lines.append(f"  {name} unavailable: {why}")
    lines.append("auto dispatch (float32, " + f"{t['rnnfast']} threads): "
                 + "; ".join(f"{k} -> {v}" for k, v in b["auto"].items()))
    env = " ".join(f"{k}={v}" for k, v in t["env"].items()) or "none set"
    lines.append(f"threads: rnnfast {t['rnnfast']} (os.cpu_count {t['cpu_count']}); env: {env}")
    c = info["cython"]
    if c["importable"]:
        lines.append(f"cython kernels: OpenMP {'yes' if c['openmp'] else 'NO (serial build)'}  ({c['path']})")
    else:
        lines.append(f"cython kernels: not importable ({c['note']})")
    isa = c.get("isa", {})
    if "error" in isa:
        lines.append(f"isa level: {isa['error']}")
    else:
        bld = c.get("build") or {}
        flags = " ".join(isa["flags"].get(isa["level"], [])) if isa.get("level") else ""
        lines.append(f"isa level: {isa.get('level') or '-'} ({isa.get('reason')}); "
                     f"{bld.get('vector_bytes', '?')}-byte vectors; built: {', '.join(isa['levels_built']) or '-'}"
                     + (f"; flags {flags}" if flags else ""))
    fr = info.get("frozen", {})
    if "error" in fr:
        lines.append(f"frozen bf16/int8 kernels: not importable ({fr['error']})")
    elif fr:
        lines.append(f"frozen layers: bf16 on {fr['bf16']}; int8 on {fr['int8']}")
    tu = info.get("tuning", {})
    if not tu.get("enabled"):
        lines.append("step forms: defaults (RNNFAST_TUNE=0)")
    elif "error" in tu:
        lines.append(f"step forms: {tu['error']}")
    else:
        pr = tu["profile"]
        lines.append("step forms (measured " + str(pr.get("date", "?")) + f", {tu['cache']}): "
                     + ", ".join(f"{k} {pr[k]}" for k in ("bsplit_max_wbytes", "rec_rowdot_rows")))
    cpu0 = info["cpu"]
    lines.append(f"compiler: gcc -march=native is {cpu0.get('native_target') or '-'}")
    n = info["numba"]
    extra = []
    if n.get("num_threads") is not None:
        extra.append(f"NUMBA_NUM_THREADS {n['num_threads']}")
    if n.get("configured_layer") is not None:
        extra.append(f"configured {n['configured_layer']!r}")
    layer = n["layer"] or "-"
    lines.append(f"numba {n['version'] or '-'}: threading layer {layer}"
                 + (f" ({', '.join(extra)})" if extra else "") + (f"; {n['note']}" if n["note"] else ""))
    if not info["blas"]:
        lines.append("blas: none found by threadpoolctl")
    for lib in info["blas"]:
        if "error" in lib:
            lines.append(f"blas: {lib['error']}")
            continue
        lines.append(f"blas: {lib.get('internal_api')} {lib.get('version')} arch {lib.get('architecture')} "
                     f"threading {lib.get('threading_layer')} threads {lib.get('num_threads')}  "
                     f"({lib.get('filepath')})")
    mem = info.get("memory")
    if mem is not None:
        lines.append("memory kept between calls: " + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in mem.items())
                     + " (rnnfast.release_memory() frees it)")
    envs = " ".join(f"{k}={v}" for k, v in info.get("env", {}).items())
    lines.append(f"environment: {envs or 'no RNNFAST_, OPENBLAS_, OMP_, MKL_ or NUMBA_ variables set'}")
    cpu = info["cpu"]
    usable = f", {cpu['usable_cpus']} usable" if "usable_cpus" in cpu else ""
    lines.append(f"cpu: {cpu['model'] or '?'} ({cpu['machine']}, {cpu['logical_cpus']} logical{usable})")
    simd = " ".join(cpu["simd"]) or "?"
    lines.append(f"simd: {simd}" + (f"  (from {cpu['simd_source']})" if cpu["simd_source"] else ""))
    v = info["versions"]
    lines.append("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
                 + "".join(f", {k} -" for k, val in v.items() if val is None))
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", action="store_true", help="print the information as JSON")
    ap.add_argument("--no-numba-trigger", action="store_true",
                    help="do not make a tiny parallel Numba call to find the threading layer")


def run(args: argparse.Namespace) -> int:
    info = collect(trigger_numba=not args.no_numba_trigger)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        print(format_info(info))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rnnfast info", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def show_config(mode: str = "stdout") -> dict | None:
    """Print (``mode="stdout"``) or return (``mode="dicts"``) what a bug report needs: the
    version, Python, backends (and why any is unavailable), threads, the kernels' ISA
    level and build, the measured step forms, Numba's threading layer, the BLAS libraries
    and their thread counts, the CPU, the relevant environment variables, the memory kept
    between calls and the versions of the libraries involved (as ``python -m rnnfast info``).
    """
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    info = collect()
    if mode == "dicts":
        return info
    print(format_info(info))
    return None
