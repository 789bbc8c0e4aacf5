"""Backend selection: "auto", "cython", "numba", "reference".

The process-wide choice is set with :func:`set_backend`; :func:`backend` overrides it
for the current thread/context only (a ``contextvars`` scope), so concurrent calls
from other threads are not affected. Kernel modules are imported on first use.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import threading
from collections.abc import Iterator
from dataclasses import dataclass

BACKENDS = ("cython", "numba", "reference")
_global = {"name": "auto"}
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("rnnfast_backend", default=None)
_modules: dict[tuple[str, str], object] = {}    # (backend, part) -> module
_lock = threading.Lock()
_broken: dict[str, str] = {}    # backend -> why its kernel module does not import



@dataclass(frozen=True)
class KernelSet:
    """The contract between rnnfast's API and a compute backend: its three kernel modules
    and what each offers beyond the common entry points. The API validates, allocates and
    packs; a kernel module only computes (kernels/__init__.py).

    Every backend's modules provide:

    - ``inference``: ``run_layer(code, x, bsz, weights of both directions, ndir, rev0,
      xg, hbuf, cst, y, hg, s2, nthreads, ...)``, one layer over packed rows
      (rnnfast._engine._run_packed builds its arguments);
    - ``training``: ``forward_layer`` and ``backward_layer``, one layer's recurrence of a
      training step (rnnfast.training._fast_forward / _fast_backward);
    - ``scans``: ``linear_scan`` and ``minrnn_forward`` (rnnfast.scan).

    and, where the flags say so: ``serving`` (``inference.run_small``, ``packed_size``,
    ``build_info``: the short-call path), ``own_gemm`` (``training.pgemm``: the training
    GEMMs on the kernels' own threads; otherwise NumPy's BLAS runs them) and
    ``packed_training`` (``training.packed_size``: recurrent weights packed per call) and
    ``variant_training`` (``forward_layer``/``backward_layer`` take a cell variant:
    ``vp=`` the variant vector of rnnfast.cells.variant_vector, ``ph0=``/``ph1=`` the
    directions' peepholes and ``dv=`` the gates' saved derivatives).
    """

    name: str
    inference: str
    training: str
    scans: str
    serving: bool = False
    own_gemm: bool = False
    packed_training: bool = False
    variant_training: bool = False

    def module(self, part: str):
        """Import (once, thread-safely) and return the ``part`` module ("inference",
        "training" or "scans"); ImportError when it does not import."""
        key = (self.name, part)
        mod = _modules.get(key)
        if mod is None:
            with _lock:
                mod = _modules.get(key)
                if mod is None:
                    mod = importlib.import_module(getattr(self, part))
                    _modules[key] = mod
        return mod


KERNEL_SETS = {
    "cython": KernelSet("cython", "rnnfast.kernels.cy_rnn", "rnnfast.kernels.cy_train", "rnnfast.kernels.cy_scan",
                        serving=True, own_gemm=True, packed_training=True, variant_training=True),
    "numba": KernelSet("numba", "rnnfast.kernels.numba_rnn", "rnnfast.kernels.numba_train",
                       "rnnfast.kernels.numba_scan", variant_training=True),
}


def kernel_set(name: str) -> KernelSet:
    """The kernels of backend `name` ("cython" or "numba")."""
    try:
        return KERNEL_SETS[name]
    except KeyError:
        raise NotImplementedError(f"backend {name!r} has no kernels (the reference backend is NumPy code)") from None


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:        # a parent package is missing (e.g. kernels not built)
        return False


def _usable(name: str) -> bool:
    """Whether backend `name`'s kernel module imports (tried once; the reason it does not
    is kept for :func:`unavailable_backends`)."""
    if name == "reference" or (name, "inference") in _modules:
        return True
    if name in _broken:
        return False
    module = KERNEL_SETS[name].inference
    if not _found(module) or (name == "numba" and not _found("numba")):
        _broken[name] = f"{module} is not installed" + (" (numba missing)" if name == "numba" else "")
        return False
    try:
        kernel_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to load makes the backend unusable
        _broken[name] = f"{module} does not import: {type(exc).__name__}: {exc}"
        return False
    return True


def available_backends() -> list[str]:
    """Names of the backends usable in this installation (always includes "reference"):
    those whose kernels import, not only exist."""
    return [name for name in BACKENDS if _usable(name)]


def unavailable_backends() -> dict[str, str]:
    """Backends that cannot be used here, each with the reason."""
    available_backends()
    return dict(_broken)


def _check(name: str, allow_auto: bool = True) -> str:
    if not isinstance(name, str):
        raise ValueError(f"backend must be a string, got {type(name).__name__}")
    if allow_auto and name == "auto":
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {['auto', *BACKENDS]}")
    if name not in available_backends():
        raise ValueError(f"backend {name!r} is not available here; available: {available_backends()}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "cython", "numba" or "reference")."""
    _global["name"] = _check(name)


def get_backend() -> str:
    """The backend name in force for this context ("auto" unless set)."""
    scoped = _scoped.get()
    return scoped if scoped is not None else _global["name"]


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Use backend `name` inside a ``with`` block (this thread/context only)."""
    token = _scoped.set(_check(name))
    try:
        yield name
    finally:
        _scoped.reset(token)


def kernel_module(name: str):
    """Import (once) and return the inference kernel module of backend `name`."""
    return KERNEL_SETS[name].module("inference")


# "auto": a fixed table written from measurements (see README, "Dispatch"); the same
# call always takes the same path. Keyed by cell kind; the Cython kernels won every
# standard workload measured (python -m rnnfast bench --backends cython,numba).
_AUTO_ORDER = ("cython", "numba", "reference")


def resolve_fast() -> str:
    """The concrete backend "auto" or the current setting names (no shape-based choice).
    (get_backend and _auto_first written out: this runs once per served token.)"""
    scoped = _scoped.get()
    name = scoped if scoped is not None else _global["name"]
    if name != "auto":
        return name
    best = _global.get("auto_first")
    return best if best is not None else _auto_first()


def _auto_first() -> str:
    best = _global.get("auto_first")
    if best is None:
        best = next(c for c in _AUTO_ORDER if _usable(c))
        _global["auto_first"] = best
    return best


def resolve(kind: str, batch: int, hidden: int, dtype, nthreads: int) -> str:
    """The concrete backend for one call under the current setting."""
    return resolve_fast()


# The Cython kernels count steps, packed rows, feature sizes and the packed weights'
# elements in C ints (their pointer offsets are 64-bit); the Numba kernels are 64-bit.
CYTHON_INDEX_MAX = 2**31 - 1


def fit_sizes(name: str, T: int, B: int, I: int, H: int, Hout: int, G: int, D: int) -> str:
    """`name`, or the backend to use instead when a call's sizes pass the Cython kernels'
    32-bit counts: under "auto" the Numba backend takes it; named, a clear ValueError
    (before any kernel runs)."""
    if name != "cython" or B == 0:    # (an empty batch runs no kernel, however long)
        return name
    Iw = max(I, D * Hout)           # a later layer's input
    worst = max(T * B, T, Iw, D * G * H * 2, G * (H + 64) * (Iw + Hout + 64))
    if worst <= CYTHON_INDEX_MAX:
        return name
    if get_backend() == "auto" and _usable("numba"):
        return "numba"
    raise ValueError(
        f"this call needs {worst} rows or elements in one 32-bit count of the Cython kernels "
        f"(at most {CYTHON_INDEX_MAX}: T={T}, B={B}, input {I}, hidden {H}); split the batch or "
        "the sequence, or run it with backend('numba')")
