"""Elementwise operations of custom cells (:class:`rnnfast.CustomRNN`).

A cell function written with these operations (and ``+ - * /``, unary ``-``, ``**`` by a
constant, comparisons, and Python scalars) is traced once by :class:`rnnfast.CustomRNN`:
called with tracer objects (:class:`Tracer`), it records an expression graph that rnnfast
compiles into fused Numba kernels and differentiates automatically.

Every operation also works on NumPy arrays and scalars (it then computes the value), so
that a cell can be checked by hand outside of tracing.

Operations: :func:`sigmoid`, :func:`tanh`, :func:`relu`, :func:`exp`, :func:`log`,
:func:`softplus`, :func:`hard_sigmoid`, :func:`abs`, :func:`minimum`, :func:`maximum`,
:func:`where`. Their derivatives are PyTorch's (``relu'(0) = 0``, ``abs'(0) = 0``, ties of
``minimum``/``maximum`` split the gradient in halves, ``softplus`` switches to the identity
above 20 as ``torch.nn.functional.softplus``).
"""
from __future__ import annotations

import builtins
import numbers
import os
import traceback
from typing import ClassVar

import numpy as np

__all__ = ["TraceError", "Tracer", "abs", "exp", "hard_sigmoid", "log", "maximum", "minimum", "relu",
           "sigmoid", "softplus", "tanh", "where"]

_HERE = (os.path.abspath(__file__)[:-3], os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom"))


class TraceError(Exception):
    """A cell function that cannot be traced (control flow on traced values, an
    unsupported operation, a wrong return structure); the message names the line."""


def user_frame(tb_frames=None) -> str:
    """``file:line in func: source`` of the innermost frame outside rnnfast's tracing code
    (the user's cell) in the current stack, or in `tb_frames` (a traceback summary)."""
    frames = tb_frames if tb_frames is not None else traceback.extract_stack()
    for fr in reversed(frames):
        fn = os.path.abspath(fr.filename)
        if not fn.startswith(_HERE) and "numpy" + os.sep not in fn:
            src = f": {fr.line.strip()}" if fr.line else ""
            return f"{fr.filename}, line {fr.lineno}, in {fr.name}{src}"
    return "<unknown location>"


def _err(msg: str) -> TraceError:
    return TraceError(f"{msg}\n  at {user_frame()}")


# ------------------------------------------------------------------ the expression graph
class Tracer:
    """A node of a traced cell's expression graph: a (B, H) array whose values are known
    only when the compiled cell runs. Python control flow on it (``if``, ``bool``,
    ``float``, indexing, iteration) raises :class:`TraceError`; use :func:`where`.

    Attributes
    ----------
    op : str
        "xp" (input projection, ``arg`` = block), "state" (``arg`` = index), "rec"
        (recurrent product, ``arg`` = block), "const" (``arg`` = value) or an operation name.
    args : tuple of Tracer
    """

    __slots__ = ("__weakref__", "arg", "args", "boolean", "id", "op")
    __array_priority__ = 1000
    _counter: ClassVar[list] = [0]

    def __init__(self, op: str, args: tuple = (), arg=None, boolean: bool = False):
        self.op, self.args, self.arg, self.boolean = op, tuple(args), arg, boolean
        Tracer._counter[0] += 1
        self.id = Tracer._counter[0]

    def __repr__(self) -> str:
        return f"Tracer({self.op}{'' if self.arg is None else ' ' + repr(self.arg)}, #{self.id})"

    # arithmetic
    def __add__(self, o):
        return _binary("add", self, o)

    def __radd__(self, o):
        return _binary("add", o, self)

    def __sub__(self, o):
        return _binary("sub", self, o)

    def __rsub__(self, o):
        return _binary("sub", o, self)

    def __mul__(self, o):
        return _binary("mul", self, o)

    def __rmul__(self, o):
        return _binary("mul", o, self)

    def __truediv__(self, o):
        return _binary("div", self, o)

    def __rtruediv__(self, o):
        return _binary("div", o, self)

    def __neg__(self):
        return _unary("neg", self)

    def __pos__(self):
        return self

    def __pow__(self, e):
        if isinstance(e, bool) or not isinstance(e, numbers.Real):
            raise _err("x ** e: a traced cell supports a constant (Python number) exponent only")
        e = float(e)
        if e == 2.0:
            return _binary("mul", self, self)
        return Tracer("pow", (self,), arg=e)

    def __abs__(self):
        return abs(self)

    # comparisons (boolean nodes for where())
    def __lt__(self, o):
        return _compare("lt", self, o)

    def __le__(self, o):
        return _compare("le", self, o)

    def __gt__(self, o):
        return _compare("gt", self, o)

    def __ge__(self, o):
        return _compare("ge", self, o)

    def __eq__(self, o):
        return _compare("eq", self, o)

    def __ne__(self, o):
        return _compare("ne", self, o)

    __hash__ = object.__hash__

    # what a trace cannot do
    def __bool__(self):
        raise _err("a traced cell cannot branch on traced values (Python `if`, `and`, `or`, `not`, `while`, "
              "bool()): the values are not known while tracing; use rnnfast.ops.where(cond, a, b)")

    def __float__(self):
        raise _err("float()/math functions of a traced value are not supported: use rnnfast.ops "
              "(sigmoid, tanh, relu, exp, log, softplus, hard_sigmoid, abs, minimum, maximum, where)")

    __int__ = __index__ = __complex__ = __float__

    def __iter__(self):
        raise _err("a traced (B, H) value cannot be iterated or unpacked")

    def __len__(self):
        raise _err("len() of a traced value is not supported")

    def __getitem__(self, key):
        raise _err("indexing or slicing a traced value is not supported (the cell is elementwise over (B, H))")

    def __array__(self, *a, **k):
        raise _err("a traced value cannot be converted to a NumPy array: write the cell with rnnfast.ops")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        f = _UFUNCS.get(ufunc.__name__) if method == "__call__" and not kwargs else None
        if f is None:
            raise _err(f"numpy.{ufunc.__name__} is not supported in a traced cell; use rnnfast.ops "
                  "(sigmoid, tanh, relu, exp, log, softplus, hard_sigmoid, abs, minimum, maximum, where) "
                  "and + - * /")
        return f(*inputs)

    def __array_function__(self, func, types, args, kwargs):
        raise _err(f"numpy.{func.__name__} is not supported in a traced cell; use rnnfast.ops")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        raise _err(f"attribute {name!r} of a traced value is not available (a traced value supports "
              "rnnfast.ops and the arithmetic operators)")


def _const(v):
    if isinstance(v, Tracer):
        return v
    if isinstance(v, (bool, np.bool_)):
        return Tracer("const", arg=float(v))
    if isinstance(v, numbers.Real):
        return Tracer("const", arg=float(v))
    if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "fiu":
        return Tracer("const", arg=float(v))
    raise _err(f"a traced cell can combine traced values with Python or NumPy scalars only, got "
          f"{type(v).__name__}{' of shape ' + str(v.shape) if hasattr(v, 'shape') else ''}")


def _binary(op: str, a, b) -> Tracer:
    a, b = _const(a), _const(b)
    if a.boolean or b.boolean:
        raise _err(f"arithmetic ({op}) on a comparison result is not supported; use rnnfast.ops.where")
    return Tracer(op, (a, b))


def _unary(op: str, a, arg=None) -> Tracer:
    a = _const(a)
    if a.boolean:
        raise _err(f"{op} of a comparison result is not supported; use rnnfast.ops.where")
    return Tracer(op, (a,), arg=arg)


def _compare(op: str, a, b) -> Tracer:
    a, b = _const(a), _const(b)
    if a.boolean or b.boolean:
        raise _err("comparisons of comparison results are not supported")
    return Tracer(op, (a, b), boolean=True)


def _traced(*xs) -> bool:
    return builtins.any(isinstance(x, Tracer) for x in xs)


# ------------------------------------------------------------------ public operations
def sigmoid(x):
    """Logistic function 1 / (1 + exp(-x))."""
    if _traced(x):
        return _unary("sigmoid", x)
    x = np.asarray(x, dtype=np.result_type(x, np.float32))
    return 1.0 / (1.0 + np.exp(-x))


def tanh(x):
    """Hyperbolic tangent."""
    return _unary("tanh", x) if _traced(x) else np.tanh(x)


def relu(x):
    """max(x, 0) (derivative 0 at 0)."""
    if _traced(x):
        return _unary("relu", x)
    x = np.asarray(x)
    return np.where(x <= 0, np.zeros((), x.dtype), x)


def exp(x):
    """Exponential."""
    return _unary("exp", x) if _traced(x) else np.exp(x)


def log(x):
    """Natural logarithm."""
    return _unary("log", x) if _traced(x) else np.log(x)


def softplus(x):
    """log(1 + exp(x)), and x itself above 20 (as ``torch.nn.functional.softplus``)."""
    if _traced(x):
        return _unary("softplus", x)
    x = np.asarray(x, dtype=np.result_type(x, np.float32))
    with np.errstate(over="ignore"):
        return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def hard_sigmoid(x, alpha: float = 0.2, beta: float = 0.5):
    """max(0, min(1, alpha * x + beta)) (ONNX's and rnnfast.cells' defaults)."""
    if _traced(x):
        return _unary("hard_sigmoid", x, arg=(float(alpha), float(beta)))
    return np.clip(alpha * np.asarray(x) + beta, 0.0, 1.0)


def abs(x):
    """Absolute value (derivative 0 at 0)."""
    return _unary("abs", x) if _traced(x) else np.abs(x)


def minimum(a, b):
    """Elementwise minimum (ties split the gradient in halves, as PyTorch)."""
    return _binary("minimum", a, b) if _traced(a, b) else np.minimum(a, b)


def maximum(a, b):
    """Elementwise maximum (ties split the gradient in halves, as PyTorch)."""
    return _binary("maximum", a, b) if _traced(a, b) else np.maximum(a, b)


def where(cond, a, b):
    """`a` where `cond` holds, else `b` (cond: a comparison of traced values)."""
    if not _traced(cond, a, b):
        return np.where(cond, a, b)
    if not isinstance(cond, Tracer):
        return _const(a) if cond else _const(b)
    if not cond.boolean:
        raise _err("where(cond, a, b): cond must be a comparison (e.g. x > 0) of traced values")
    a, b = _const(a), _const(b)
    if a.boolean or b.boolean:
        raise _err("where(cond, a, b): a and b must be values, not comparisons")
    return Tracer("where", (cond, a, b))


# NumPy ufuncs on tracers that map onto the operations above
_UFUNCS = {
    "add": lambda a, b: _binary("add", a, b), "subtract": lambda a, b: _binary("sub", a, b),
    "multiply": lambda a, b: _binary("mul", a, b), "true_divide": lambda a, b: _binary("div", a, b),
    "divide": lambda a, b: _binary("div", a, b), "negative": lambda a: _unary("neg", a),
    "tanh": tanh, "exp": exp, "log": log, "absolute": abs, "minimum": minimum, "maximum": maximum,
    "greater": lambda a, b: _compare("gt", a, b), "greater_equal": lambda a, b: _compare("ge", a, b),
    "less": lambda a, b: _compare("lt", a, b), "less_equal": lambda a, b: _compare("le", a, b),
}
