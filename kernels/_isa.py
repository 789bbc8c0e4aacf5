"""Which ISA level of the compiled kernels this process loads, and why.

setup.py builds each Cython module once per level (``rnnfast.kernels.<level>.<name>``;
the levels built are listed in ``_built.py``). At the first import of a compiled kernel
module the best level this CPU runs is chosen, as NumPy and OpenBLAS choose theirs:
``avx512`` needs AVX-512 F/CD/BW/DQ/VL, ``avx2`` AVX2 and FMA, ``baseline`` nothing
beyond x86-64 (or the machine's own baseline elsewhere). The CPU's features come from
NumPy's runtime detection, which also checks that the OS saves the vector state.
``RNNFAST_ISA=baseline|avx2|avx512`` forces a level: one the CPU lacks, or one not
built, is an error, never a crash with an illegal instruction. A ``native`` build
(``RNNFAST_MARCH``) has one level, made for the machine that built it.
"""
from __future__ import annotations

import os

LEVEL_ORDER = ("baseline", "avx2", "avx512")
# NumPy's names (numpy._core._multiarray_umath.__cpu_features__) of what each level needs
REQUIRES = {"baseline": (), "avx2": ("AVX2", "FMA3"), "avx512": ("AVX512F", "AVX512CD", "AVX512_SKX")}

_chosen: tuple[str, str] | None = None


def built_levels() -> list[str]:
    """The levels this installation was built with, best last."""
    try:
        from ._built import LEVELS
    except ImportError:         # built before multi-level builds: one unnamed level
        return []
    return list(LEVELS)


def built_flags() -> dict[str, list[str]]:
    try:
        from ._built import FLAGS
    except ImportError:
        return {}
    return dict(FLAGS)


def cpu_features() -> dict[str, bool]:
    """NumPy's runtime CPU detection ({} where it has none: the baseline level only)."""
    for modname in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            mod = __import__(modname, fromlist=["__cpu_features__"])
            return dict(getattr(mod, "__cpu_features__", {}))
        except ImportError:
            continue
    return {}


def cpu_supports(level: str) -> bool:
    if level == "native":
        return True
    feats = cpu_features()
    return all(feats.get(k, False) for k in REQUIRES.get(level, ("?",)))


def choose() -> tuple[str, str]:
    """(level, reason) for this process: RNNFAST_ISA if set, else the best level built
    that the CPU supports. Raises RuntimeError for a forced level that cannot run."""
    global _chosen
    if _chosen is not None:
        return _chosen
    built = built_levels()
    forced = os.environ.get("RNNFAST_ISA", "").strip().lower()
    if forced:
        if forced not in LEVEL_ORDER and forced != "native":
            raise RuntimeError(f"RNNFAST_ISA={forced!r}: expected one of {', '.join(LEVEL_ORDER)}")
        if forced not in built:
            raise RuntimeError(f"RNNFAST_ISA={forced!r}: this installation has the levels {built} "
                               "(a RNNFAST_MARCH build has one, 'native')")
        if not cpu_supports(forced):
            missing = [k for k in REQUIRES[forced] if not cpu_features().get(k, False)]
            raise RuntimeError(f"RNNFAST_ISA={forced!r}: this CPU lacks {', '.join(missing)}")
        _chosen = (forced, "forced by RNNFAST_ISA")
        return _chosen
    if not built:
        _chosen = ("", "single-level build")
        return _chosen
    for level in reversed(built):
        if cpu_supports(level):
            skipped = built[built.index(level) + 1:]
            why = "best level built" if not skipped else f"the CPU lacks {', '.join(skipped)}"
            _chosen = (level, why)
            return _chosen
    raise RuntimeError(f"rnnfast: no kernel level this CPU can run (built: {built})")
