"""``CustomRNN``: a recurrent layer whose cell is a Python function, traced and compiled.

The user writes one step of the cell with elementwise math (:mod:`rnnfast.ops` and the
arithmetic operators) and one primitive for the recurrent product::

    def cell(xp, state, rec):       # xp[k]: this step's input projection of gate block k
        ...                         # rec(v, k) = v @ W_hh[k*H:(k+1)*H].T + b_hh[k*H:(k+1)*H]
        return new_state, output    # new_state like state (h, or a tuple (h, c, ...))

How it runs (one layer, one direction):

1. Tracing (once, in the constructor): the function is called with tracer objects
   (:class:`rnnfast.ops.Tracer`) and records an expression graph. Each node gets a
   *stage*: leaves (input projections, states) are stage 0, a recurrent product is one
   stage after its argument, an elementwise node is the stage of its latest argument.
   The recurrent products of one stage that share their argument form one GEMM (their
   blocks of ``W_hh`` side by side), so a step makes as few passes as the data allow
   (an LSTM: one; the seed cell of issue 19: two).
2. The input projections of all steps are one GEMM (``x @ W_ih.T + b_ih``; the Cython
   kernels' own GEMM where built).
3. The steps run in one generated Numba function (the loop over time inside): per
   stage, a fused elementwise loop over (B, H), then that stage's GEMMs (``np.dot``).
   The rows of a step are independent, so each thread runs that function for a range
   of the (length-sorted) rows, all steps, with no barrier between threads; float32
   exp and tanh are kernels/numba_vmath.py's, which vectorise.
4. Training: the forward keeps the states of every step and the products' results;
   the backward is generated from the same graph by reverse-mode differentiation, stage
   by stage from the last (recomputing the elementwise values from what was kept), with
   the products' adjoints sent back through ``W_hh`` by GEMMs. Weight gradients are large
   GEMMs over all steps afterwards.

Variable lengths run as PyTorch's packed sequences: the rows are sorted by length once
and a step computes only the rows still running (padded steps cost nothing; their
outputs are 0, their states carried).
"""
from __future__ import annotations

import inspect
import itertools
import numbers
import os
import re
import sys
import threading
import traceback

import numpy as np

from . import _engine, backends, threads
from ._validation import check_input, check_lengths, check_state, to_numpy
from .layers import _check_dtype, _check_int, _PickledAsParameters
from .ops import TraceError, Tracer, user_frame

__all__ = ["CustomRNN", "TraceError", "trace_cell"]

_MAX_INFERRED_STATES = 8


# ============================================================================ tracing
class _NeedTuple(TraceError):
    pass


class _BareState(Tracer):
    """The state leaf when the number of states is being inferred: unpacking or indexing
    it means the cell takes a tuple of states."""

    __slots__ = ()

    def __iter__(self):
        raise _NeedTuple("the cell unpacks its state")

    def __getitem__(self, key):
        raise _NeedTuple("the cell indexes its state")

    def __len__(self):
        raise _NeedTuple("the cell takes len() of its state")


class Graph:
    """A traced cell: nodes in topological order (what the outputs need only), their
    stages, and the recurrent products grouped into GEMMs.

    Attributes
    ----------
    nodes : list of Tracer (topological order)
    states : list of Tracer (the new states);  output : Tracer
    num_states, gates : int
    stage : dict id -> stage;  final : the last stage (number of GEMM passes)
    groups : list of (level, v node, [rec nodes]) - one GEMM each, at pass `level`
    """

    def __init__(self, states: list, output: Tracer, num_states: int, gates: int):
        self.states, self.output, self.num_states, self.gates = states, output, num_states, gates
        roots = [*states, output]
        order, seen = [], set()
        for root in roots:                      # iterative post-order DFS
            stack = [(root, False)]
            while stack:
                n, done = stack.pop()
                if done:
                    order.append(n)
                    continue
                if n.id in seen:
                    continue
                seen.add(n.id)
                stack.append((n, True))
                for a in reversed(n.args):
                    if a.id not in seen:
                        stack.append((a, False))
        self.nodes = order
        stage = {}
        for n in order:
            if n.op in ("xp", "state", "const"):
                stage[n.id] = 0
            elif n.op == "rec":
                stage[n.id] = stage[n.args[0].id] + 1
            else:
                stage[n.id] = max(stage[a.id] for a in n.args)
        self.stage = stage
        self.final = max(stage[r.id] for r in roots)
        groups: dict[int, list] = {}
        gv: dict[int, Tracer] = {}
        for n in order:
            if n.op == "rec":
                v = n.args[0]
                groups.setdefault(v.id, []).append(n)
                gv[v.id] = v
        # blocks in W_hh's order within a GEMM (a contiguous slice where the cell allows)
        self.groups = [(stage[vid], gv[vid], sorted(recs, key=lambda r: r.arg)) for vid, recs in groups.items()]
        self.groups.sort(key=lambda g: g[0])

    def describe(self) -> str:
        """Human-readable summary of the GEMM passes of one step."""
        parts = []
        for p in range(self.final):
            gs = [g for g in self.groups if g[0] == p]
            parts.append(f"pass {p}: " + "; ".join(
                f"blocks {[r.arg for r in recs]} from {_name(v)}" for _, v, recs in gs))
        return "\n".join(parts) if parts else "no recurrent product"


def _name(n: Tracer) -> str:
    if n.op == "state":
        return f"state[{n.arg}]"
    if n.op == "xp":
        return f"xp[{n.arg}]"
    return f"{n.op}#{n.id}"


def _call_traced(cell, xp, state, rec):
    """Call `cell` and return (result, line of its return) ; exceptions become TraceError
    naming the user's line."""
    caller = sys._getframe()
    ret_line = []

    def prof(frame, event, arg):
        if event == "return" and frame.f_back is caller:
            ret_line.append(f"{frame.f_code.co_filename}, line {frame.f_lineno}, in {frame.f_code.co_name}")

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        out = cell(xp, state, rec)
    except TraceError:
        raise
    except Exception as e:  # any failure of the user's function, named by its line
        frames = traceback.extract_tb(e.__traceback__)
        mine = [f for f in frames if f.filename == _cell_file(cell)]
        where = user_frame(mine[-1:] if mine else frames)
        raise TraceError(f"the cell function failed while being traced: {type(e).__name__}: {e}\n  at {where}") \
            from e
    finally:
        sys.setprofile(old)
    return out, (ret_line[-1] if ret_line else _def_line(cell))


def _cell_file(cell) -> str | None:
    try:
        f = inspect.unwrap(cell)
        code = getattr(f, "__code__", None) or type(f).__call__.__code__
        return code.co_filename
    except Exception:  # noqa: BLE001
        return None


def _def_line(cell) -> str:
    try:
        f = inspect.unwrap(cell)
        return f"{f.__code__.co_filename}, line {f.__code__.co_firstlineno}, in {f.__name__}"
    except Exception:  # noqa: BLE001
        return repr(cell)


def trace_cell(cell, gates: int, num_states: int | None = None) -> Graph:
    """Trace `cell` (see :class:`CustomRNN`) into a :class:`Graph`.

    Parameters
    ----------
    cell : callable ``cell(xp, state, rec) -> (new_state, output)``.
    gates : number of gate blocks G (``xp`` has G entries, ``rec(v, k)`` takes k < G).
    num_states : number of states; None infers it (a bare state, or a tuple when the
        cell unpacks, indexes or returns a tuple).

    Raises
    ------
    TraceError : naming the line of the cell that cannot be traced.
    """
    if not callable(cell):
        raise TypeError(f"cell: expected a function cell(xp, state, rec), got {type(cell).__name__}")
    if num_states is None:
        try:
            return _trace(cell, gates, None)
        except _NeedTuple as e:
            first = e
            hint = None
        except _TupleReturned as e:
            first = e
            hint = e.n
        tries = [hint] if hint else list(range(2, _MAX_INFERRED_STATES + 1))
        for n in tries:
            try:
                return _trace(cell, gates, n)
            except TraceError as e:
                last = e
        if hint:
            raise last
        raise TraceError(f"could not infer the number of states of the cell ({first}); "
                         f"pass num_states=; last error: {last}") from None
    return _trace(cell, gates, num_states)


class _TupleReturned(TraceError):
    def __init__(self, msg, n):
        super().__init__(msg)
        self.n = n


def _trace(cell, G: int, nS: int | None) -> Graph:
    xp = tuple(Tracer("xp", arg=k) for k in range(G))
    if nS is None:
        state = _BareState("state", arg=0)
        leaves = [state]
    else:
        leaves = [Tracer("state", arg=q) for q in range(nS)]
        state = leaves[0] if nS == 1 else tuple(leaves)
    cache: dict = {}

    def rec(v, k):
        """``v @ W_hh[k*H:(k+1)*H].T + b_hh[k*H:(k+1)*H]`` (traced)."""
        if not isinstance(v, Tracer) or v.boolean:
            raise TraceError(f"rec(v, k): v must be a traced (B, H) value of the cell, got {type(v).__name__}"
                             f"\n  at {user_frame()}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= int(k) < G:
            raise TraceError(f"rec(v, k): k must be a gate block index in [0, {G}), got {k!r}\n  at {user_frame()}")
        if v.op == "const":
            raise TraceError(f"rec(v, k): v is a constant\n  at {user_frame()}")
        key = (v.id, int(k))
        if key not in cache:
            cache[key] = Tracer("rec", (v,), arg=int(k))
        return cache[key]

    out, ret = _call_traced(cell, xp, state, rec)
    want = "a tuple (new_state, output)"
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TraceError(f"the cell must return {want}, got {_describe(out)}\n  at {ret}")
    new_state, output = out
    if nS is None:
        if isinstance(new_state, (tuple, list)):
            if len(new_state) == 1:
                new_state = new_state[0]
            else:
                raise _TupleReturned(f"the cell returned {len(new_state)} states", len(new_state))
        states = [new_state]
        nS = 1
    elif nS == 1:
        states = [new_state[0] if isinstance(new_state, (tuple, list)) and len(new_state) == 1 else new_state]
    else:
        if not isinstance(new_state, (tuple, list)) or len(new_state) != nS:
            raise TraceError(f"the cell's state has {nS} entries, so it must return a tuple of {nS} new states "
                             f"first, got {_describe(new_state)}\n  at {ret}")
        states = list(new_state)
    for i, s in enumerate(states):
        states[i] = _check_out(s, f"new state {i}" if nS > 1 else "the new state", ret)
    output = _check_out(output, "the output", ret)
    if nS is not None and leaves and isinstance(leaves[0], _BareState):
        leaves[0].__class__ = Tracer
    return Graph(states, output, nS, G)


def _describe(v) -> str:
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of {len(v)}"
    return type(v).__name__


def _check_out(v, what: str, ret: str) -> Tracer:
    if isinstance(v, Tracer):
        if v.boolean:
            raise TraceError(f"{what} is a comparison; return values (use rnnfast.ops.where)\n  at {ret}")
        return v
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return Tracer("const", arg=float(v))
    raise TraceError(f"{what} must be a traced value computed by the cell, got {_describe(v)}\n  at {ret}")


# ============================================================================ code generation
def _lit(x: float) -> str:
    r = repr(float(x))
    if r in ("inf", "-inf", "nan"):
        return f"np.{r.lstrip('-')}" if r[0] != "-" else "(-np.inf)"
    return f"({r})"


_FWD = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}", "neg": "-{0}",
    "sigmoid": "1.0 / (1.0 + np.exp(-{0}))", "tanh": "np.tanh({0})", "relu": "0.0 if {0} <= 0.0 else {0}",
    "exp": "np.exp({0})", "log": "np.log({0})", "softplus": "{0} if {0} > 20.0 else np.log1p(np.exp({0}))",
    "abs": "abs({0})", "minimum": "{0} if ({0} < {1} or {0} != {0}) else {1}",
    "maximum": "{0} if ({0} > {1} or {0} != {0}) else {1}", "where": "{1} if {0} else {2}",
    "lt": "{0} < {1}", "le": "{0} <= {1}", "gt": "{0} > {1}", "ge": "{0} >= {1}", "eq": "{0} == {1}",
    "ne": "{0} != {1}",
}


def _fwd_expr(n: Tracer, a: list) -> str:
    if n.op == "hard_sigmoid":
        al, be = n.arg
        return f"min(max({_lit(al)} * {a[0]} + {_lit(be)}, 0.0), 1.0)"
    if n.op == "pow":
        return f"{a[0]} ** {_lit(n.arg)}"
    return _FWD[n.op].format(*a)


def _vjp(n: Tracer, g: str, V: str, a: list) -> list:
    """(argument index, contribution to its adjoint) of node n with adjoint g, value V."""
    A = a[0]
    B = a[1] if len(a) > 1 else None
    op = n.op
    if op == "add":
        return [(0, g), (1, g)]
    if op == "sub":
        return [(0, g), (1, f"-{g}")]
    if op == "mul":
        return [(0, f"{g} * {B}"), (1, f"{g} * {A}")]
    if op == "div":
        return [(0, f"{g} / {B}"), (1, f"-{g} * {V} / {B}")]
    if op == "neg":
        return [(0, f"-{g}")]
    if op == "sigmoid":
        return [(0, f"{g} * {V} * (1.0 - {V})")]
    if op == "tanh":
        return [(0, f"{g} * (1.0 - {V} * {V})")]
    if op == "relu":
        return [(0, f"{g} if {A} > 0.0 else 0.0")]
    if op == "exp":
        return [(0, f"{g} * {V}")]
    if op == "log":
        return [(0, f"{g} / {A}")]
    if op == "softplus":
        return [(0, f"{g} if {A} > 20.0 else {g} / (1.0 + np.exp(-{A}))")]
    if op == "hard_sigmoid":
        al, be = n.arg
        u = f"({_lit(al)} * {A} + {_lit(be)})"
        return [(0, f"{g} * {_lit(al)} if ({u} >= 0.0 and {u} <= 1.0) else 0.0")]
    if op == "abs":
        return [(0, f"{g} * (1.0 if {A} > 0.0 else (-1.0 if {A} < 0.0 else 0.0))")]
    if op == "minimum":
        return [(0, f"{g} if {A} < {B} else (0.5 * {g} if {A} == {B} else 0.0)"),
                (1, f"{g} if {B} < {A} else (0.5 * {g} if {A} == {B} else 0.0)")]
    if op == "maximum":
        return [(0, f"{g} if {A} > {B} else (0.5 * {g} if {A} == {B} else 0.0)"),
                (1, f"{g} if {B} > {A} else (0.5 * {g} if {A} == {B} else 0.0)")]
    if op == "where":
        return [(1, f"{g} if {A} else 0.0"), (2, f"0.0 if {A} else {g}")]
    if op == "pow":
        return [(0, f"{g} * {_lit(n.arg)} * {A} ** {_lit(n.arg - 1.0)}")]
    if op in ("lt", "le", "gt", "ge", "eq", "ne"):
        return []
    raise NotImplementedError(op)


class _Plan:
    """Generated sources and the layout of a graph's buffers."""

    def __init__(self, g: Graph):
        self.g = g
        st = g.stage
        F = g.final
        self.idx = {n.id: i for i, n in enumerate(g.nodes)}
        # the latest stage that reads each node
        last = {n.id: st[n.id] for n in g.nodes}
        for n in g.nodes:
            if n.op != "rec":
                for a in n.args:
                    last[a.id] = max(last[a.id], st[n.id])
        for _, v, _recs in g.groups:
            last[v.id] = max(last[v.id], st[v.id] + 1)
        for r in [*g.states, g.output]:
            last[r.id] = F
        self.group_of = {}          # rec id -> (group index, position)
        self.vgroup = {}            # v id -> group index
        for gi, (_, v, recs) in enumerate(g.groups):
            self.vgroup[v.id] = gi
            for q, r in enumerate(recs):
                self.group_of[r.id] = (gi, q)
        # cross-stage op nodes: a value buffer (forward) / adjoint buffer (backward)
        self.cross = {}
        for n in g.nodes:
            if n.op in ("xp", "state", "const"):
                continue
            if last[n.id] > st[n.id] and not n.boolean:
                self.cross[n.id] = len(self.cross)
        # boolean nodes read in a later stage are recomputed there (in forward: valued buffers)
        self.cval = {}
        for n in g.nodes:
            if n.op in ("xp", "state", "const", "rec") or n.id in self.vgroup:
                continue
            if last[n.id] > st[n.id]:
                self.cval[n.id] = len(self.cval)
        self.vsave = [gi for gi, (_, v, _) in enumerate(g.groups) if v.op != "state"]
        self.fwd_src = self._forward()
        self.bwd_src = self._backward()

    # ------------------------------------------------------------------ helpers
    def _var(self, n: Tracer) -> str:
        return _lit(n.arg) if n.op == "const" else f"v{self.idx[n.id]}"

    def _leaf_load(self, n: Tracer) -> str | None:
        """Expression reading a leaf or a rec node's value (None for op nodes)."""
        if n.op == "xp":
            return f"xp[t, b, {n.arg} * H + j]"
        if n.op == "state":
            return f"Sin[{n.arg}, r, j]"
        if n.op == "rec":
            gi, q = self.group_of[n.id]
            return f"R{gi}[r, {q} * H + j] + bhh[{n.arg} * H + j]"
        return None

    @staticmethod
    def _header() -> list:
        return ["    H = Sall.shape[3]", "    B = perm.shape[0]"]

    def _row(self, ind: str) -> list:
        return [f"{ind}for r in range(r0, hi):",
                f"{ind}    b = perm[r]",
                f"{ind}    t = s if rev == 0 else lp[r] - 1 - s",
                f"{ind}    for j in range(H):"]

    # ------------------------------------------------------------------ forward
    def _forward(self) -> str:
        g = self.g
        st, F = g.stage, g.final
        ng = len(g.groups)
        rs = ", ".join(f"Ra{i}" for i in range(ng))
        vs = ", ".join(f"Va{i}" for i in self.vsave)
        wts = ", ".join(f"WT{i}" for i in range(ng))
        args = ["r0", "r1", "xp", "perm", "lp", "rev", "nsteps", "train", "Sall", "C", "bhh", "y"]
        args += [a for a in (rs, vs, wts) if a]
        L = [f"def fwd({', '.join(args)}):"]
        L += self._header()
        L.append("    nact = B")
        L.append("    for s in range(nsteps):")
        L.append("        while nact > 0 and lp[nact - 1] <= s:")
        L.append("            nact -= 1")
        L.append("        hi = nact if nact < r1 else r1")
        L.append("        if hi <= r0:")
        L.append("            hi = r0")
        L.append("        si = s * train")
        L.append("        Sin = Sall[si]")
        L.append("        Sout = Sall[si + train]")
        L.append("        if train:")
        L.append("            for q in range(Sin.shape[0]):")
        L.append("                for r in range(hi, r1):")
        L.append("                    for j in range(H):")
        L.append("                        Sout[q, r, j] = Sin[q, r, j]")
        for i in range(ng):
            L.append(f"        R{i} = Ra{i}[si]")
        for i in self.vsave:
            L.append(f"        V{i} = Va{i}[si]")
        ind = " " * 16
        for p in range(F + 1):
            L += self._row(" " * 8)
            body = []
            mine = [n for n in g.nodes if st[n.id] == p and n.op != "const"]
            needed = set()
            for n in mine:
                if n.op not in ("rec", "xp", "state"):
                    for a in n.args:
                        if st[a.id] < p:
                            needed.add(a.id)
            if p == F:
                for n in [*g.states, g.output]:
                    if st[n.id] < p:
                        needed.add(n.id)
            for n in g.nodes:           # loads of earlier nodes
                if n.id in needed and n.op != "const":
                    body.append(f"{self._var(n)} = {self._load_earlier(n)}")
            for n in mine:
                if n.op in ("xp", "state", "rec"):
                    body.append(f"{self._var(n)} = {self._leaf_load(n)}")
                else:
                    body.append(f"{self._var(n)} = {_fwd_expr(n, [self._var(a) for a in n.args])}")
                if n.id in self.vgroup and n.op != "state":
                    body.append(f"V{self.vgroup[n.id]}[r, j] = {self._var(n)}")
                elif n.id in self.cval:
                    val = f"1.0 if {self._var(n)} else 0.0" if n.boolean else self._var(n)
                    body.append(f"C[{self.cval[n.id]}, r, j] = {val}")
            if p == F:
                for q, n in enumerate(g.states):
                    body.append(f"Sout[{q}, r, j] = {self._var(n)}")
                body.append(f"y[t, b, j] = {self._var(g.output)}")
            if not body:
                body.append("pass")
            L += [ind + x for x in body]
            if p < F:
                for gi, (lev, v, _recs) in enumerate(g.groups):
                    if lev != p:
                        continue
                    src = f"Sin[{v.arg}, r0:hi]" if v.op == "state" else f"V{gi}[r0:hi]"
                    L.append("        if hi > r0:")
                    L.append(f"            np.dot({src}, WT{gi}, R{gi}[r0:hi])")
        return "\n".join(L) + "\n"

    def _load_earlier(self, n: Tracer) -> str:
        ld = self._leaf_load(n)
        if ld is not None:
            return ld
        if n.id in self.vgroup:
            return f"V{self.vgroup[n.id]}[r, j]"
        return f"C[{self.cval[n.id]}, r, j]" + (" != 0.0" if n.boolean else "")

    # ------------------------------------------------------------------ backward
    def _backward(self) -> str:
        g = self.g
        st, F = g.stage, g.final
        ng = len(g.groups)
        args = ["r0", "r1", "xp", "perm", "lp", "rev", "nsteps", "Sall", "bhh", "dy", "dS", "dSp", "A", "dxp", "dvb"]
        args += [f"Ra{i}" for i in range(ng)] + [f"dRa{i}" for i in range(ng)] + [f"W{i}" for i in range(ng)]
        L = [f"def bwd({', '.join(args)}):"]
        L += self._header()
        L.append("    nact = 0")
        L.append("    for s in range(nsteps - 1, -1, -1):")
        L.append("        while nact < B and lp[nact] > s:")
        L.append("            nact += 1")
        L.append("        hi = nact if nact < r1 else r1")
        L.append("        if hi <= r0:")
        L.append("            hi = r0")
        L.append("        Sin = Sall[s]")
        for i in range(ng):
            L.append(f"        R{i} = Ra{i}[s]")
            L.append(f"        dR{i} = dRa{i}[s]")
        L.append("        for r in range(r0, hi):")
        L.append("            for j in range(H):")
        L.append("                for q in range(dSp.shape[0]):")
        L.append("                    dSp[q, r, j] = 0.0")
        L.append("                for q in range(A.shape[0]):")
        L.append("                    A[q, r, j] = 0.0")
        ind = " " * 16
        outs = [(f"dS[{q}, r, j]", n) for q, n in enumerate(g.states)] + [("dy[t, b, j]", g.output)]
        for p in range(F, -1, -1):
            L += self._row(" " * 8)
            body = []
            # values of every node up to this stage (recomputed)
            for n in g.nodes:
                if st[n.id] > p or n.op == "const":
                    continue
                ld = self._leaf_load(n)
                if ld is None:
                    ld = _fwd_expr(n, [self._var(a) for a in n.args])
                body.append(f"{self._var(n)} = {ld}")
            mine = [n for n in g.nodes if st[n.id] == p and n.op not in ("xp", "state", "const") and not n.boolean]
            for n in mine:
                init = f"A[{self.cross[n.id]}, r, j]" if n.id in self.cross else "0.0"
                body.append(f"a{self.idx[n.id]} = {init}")
            if p == F:
                for seed, n in outs:
                    body.append(self._add_to(n, seed, p))
            for n in reversed(mine):
                a_n = f"a{self.idx[n.id]}"
                if n.op == "rec":
                    gi, q = self.group_of[n.id]
                    body.append(f"dR{gi}[r, {q} * H + j] = {a_n}")
                    continue
                for k, e in _vjp(n, a_n, self._var(n), [self._var(a) for a in n.args]):
                    line = self._add_to(n.args[k], f"({e})", p)
                    if line:
                        body.append(line)
            L += [ind + x for x in (body or ["pass"])]
            if p >= 1:
                for gi, (lev, v, _recs) in enumerate(g.groups):
                    if lev != p - 1:
                        continue
                    L.append("        dv = dvb[r0:hi]")
                    L.append("        if hi > r0:")
                    L.append(f"            np.dot(dR{gi}[r0:hi], W{gi}, dv)")
                    L += self._row(" " * 8)
                    L.append(ind + self._add_to(v, "dv[r - r0, j]", p, force_buffer=True))
        L.append("        for q in range(dS.shape[0]):")
        L.append("            for r in range(r0, hi):")
        L.append("                for j in range(H):")
        L.append("                    dS[q, r, j] = dSp[q, r, j]")
        return "\n".join(L) + "\n"

    def _add_to(self, n: Tracer, e: str, p: int, force_buffer: bool = False) -> str:
        """Source adding `e` to the adjoint of `n` while processing stage p."""
        if n.op == "const" or n.boolean:
            return ""
        if n.op == "xp":
            return f"dxp[t, b, {n.arg} * H + j] += {e}"
        if n.op == "state":
            return f"dSp[{n.arg}, r, j] += {e}"
        if self.g.stage[n.id] < p or force_buffer:
            return f"A[{self.cross[n.id]}, r, j] += {e}"
        return f"a{self.idx[n.id]} += {e}"


# ============================================================================ compiled kernels
_KERNELS: dict = {}
# Rows per thread below which a call runs on one thread: a step's products of fewer rows
# are too small to pay for a thread's share of the weights read.
_MIN_ROWS_PER_THREAD = 2
_POOL = None
_POOL_LOCK = threading.Lock()


def _row_chunks(lp: np.ndarray, nthr: int) -> list[tuple[int, int]]:
    """Contiguous ranges of the length-sorted rows, one per thread, of about equal work
    (sum of lengths): each range runs the whole recurrence of its rows with no barrier
    between threads (the rows of a step are independent)."""
    B = lp.shape[0]
    n = min(nthr, B // _MIN_ROWS_PER_THREAD) if B else 1
    if n <= 1:
        return [(0, B)]
    work = np.cumsum(lp, dtype=np.float64)
    total = work[-1]
    if total <= 0:
        return [(0, B)]
    cuts = [0]
    for c in range(1, n):
        r = int(np.searchsorted(work, total * c / n)) + 1     # the row reaching the share ends the range
        cuts.append(min(max(r, cuts[-1] + 1), B - (n - c)))
    cuts.append(B)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _run_chunks(kernel, chunks, *args) -> None:
    """``kernel(r0, r1, *args)`` for every row range, the first on this thread and the
    others on the pool's threads at the same time (the kernels release the GIL)."""
    global _POOL
    if len(chunks) == 1:
        kernel(*chunks[0], *args)
        return
    with _POOL_LOCK:
        if _POOL is None:
            import concurrent.futures
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                                          thread_name_prefix="rnnfast-custom")
        pool = _POOL
    futs = [pool.submit(kernel, *c, *args) for c in chunks[1:]]
    try:
        kernel(*chunks[0], *args)
    finally:
        for f in futs:
            f.result()


def _big_gemm(nthr: int):
    """``mm(A, B) -> A @ B`` for the whole-sequence products (input projections, weight and
    input gradients): the Cython kernels' own GEMM on OpenMP threads where it is built,
    else NumPy's BLAS on `nthr` threads. NumPy's OpenBLAS keeps its threads spinning for a
    while after a call, and they took the cores from the row ranges' threads that run the
    steps next (commit bcbf021; figures in docs/performance.md)."""
    if "cython" in backends.available_backends():
        from ._train_fast import _gemm_for
        gemm = _gemm_for("cython", backends.kernel_set("cython").module("training"), nthr)

        def mm(A, B):
            C = np.empty((A.shape[0], B.shape[1]), np.result_type(A, B))
            gemm(A, B, C)
            return C
        return mm
    threads.set_blas_threads(nthr)
    return np.dot


def _forget_pool_in_child() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)
_KLOCK = threading.Lock()


def _fastmath() -> set:
    try:
        from .kernels.numba_common import FASTMATH
        return set(FASTMATH)
    except Exception:  # noqa: BLE001 - kernels not built: the same flags, never nnan/ninf
        return {"nsz", "arcp", "contract", "afn", "reassoc"}


_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*(?:e[-+]?\d+)?|\d+e[-+]?\d+)")


def _compile(src: str, name: str, dtype: np.dtype):
    """The njit function `name` of `src`; for float32 its float literals are float32, so
    that the arithmetic stays in single precision (Numba types a bare 1.0 as float64)."""
    key = (src, np.dtype(dtype).name)
    with _KLOCK:
        fn = _KERNELS.get(key)
        if fn is None:
            import numba
            ns: dict = {"np": np, "f4": np.float32}
            if np.dtype(dtype) == np.float32:
                src = _FLOAT_LITERAL.sub(r"f4(\1)", src)
                # exp and tanh that vectorise (libm's are scalar calls in Numba without
                # SVML); float64 keeps libm's, the oracle-precision path
                from .kernels import numba_vmath
                src = src.replace("np.exp(", "expf(").replace("np.tanh(", "tanhf(")
                ns.update(expf=numba_vmath.expf, tanhf=numba_vmath.tanhf)
            exec(compile(src, f"<rnnfast.custom {name}>", "exec"), ns)
            fn = numba.njit(fastmath=_fastmath(), error_model="numpy", nogil=True)(ns[name])
            _KERNELS[key] = fn
        return fn


# ============================================================================ the layer
class _DirRun:
    """What a training forward of one layer and direction keeps."""

    __slots__ = ("R", "S", "V", "inp", "lp", "nsteps", "perm", "xp")


class CustomRNN(_PickledAsParameters):
    """A multi-layer, optionally bidirectional recurrent layer with a user-written cell.

    Parameters
    ----------
    input_size, hidden_size : int
    cell : callable ``cell(xp, state, rec) -> (new_state, output)``
        One step, written with :mod:`rnnfast.ops` and ``+ - * /``: ``xp[k]`` is the step's
        input projection of gate block k, ``x_t @ W_ih[k*H:(k+1)*H].T + b_ih[k*H:(k+1)*H]``;
        ``state`` is h, or a tuple ``(h, c, ...)``; ``rec(v, k) = v @ W_hh[k*H:(k+1)*H].T
        + b_hh[k*H:(k+1)*H]``. It returns the new state(s), structured like ``state``, and
        the step's output (all (B, H)). It is traced once, here.
    gates : int
        Number of gate blocks G (rows of ``W_ih``/``W_hh`` are G*H).
    num_layers, bias, bidirectional, batch_first, dtype, seed :
        As :class:`rnnfast.LSTM` (no dropout, no projection).
    num_states : int, optional (keyword)
        Number of states; inferred from the cell when None.
    num_threads : int, optional (keyword)
        The most threads one call uses.

    Raises
    ------
    rnnfast.ops.TraceError
        When the cell cannot be traced (Python control flow on traced values, an
        unsupported operation, a wrong return structure); the message names the line.

    Notes
    -----
    Parameters ``weight_ih_l{k}`` (G*H, I or D*H), ``weight_hh_l{k}`` (G*H, H),
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` (G*H,), ``_reverse`` for the backward direction,
    initialised U(-1/sqrt(H), 1/sqrt(H)) in the order of :class:`rnnfast.LSTM`. ``hx`` is
    an (L*D, B, H) array, or a tuple of them for several states; ``forward(x, hx,
    lengths, train)`` / ``backward(dy, dhx_n)`` / ``grads`` as the built-in layers.
    """

    _TRANSIENT = ("_splan", "_wcache", "_ctx", "grads", "_plan")

    def __init__(self, input_size: int, hidden_size: int, cell=None, gates: int = 1, num_layers: int = 1,
                 bias: bool = True, bidirectional: bool = False, batch_first: bool = False, dtype=np.float32,
                 seed=None, *, num_states: int | None = None, num_threads: int | None = None):
        self.num_threads = num_threads
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.gates = _check_int("gates", gates, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        if num_states is not None:
            num_states = _check_int("num_states", num_states, 1)
        self.bias = bool(bias)
        self.bidirectional = bool(bidirectional)
        self.batch_first = bool(batch_first)
        self.dtype = _check_dtype(dtype)
        self.seed = seed
        self.cell = cell
        self.graph = trace_cell(cell, self.gates, num_states)
        self.num_states = self.graph.num_states
        self._rng = np.random.default_rng(seed)
        self.grads: dict[str, np.ndarray] = {}
        self._ctx = None
        G, H, D = self.gates, self.hidden_size, self.num_directions
        k = 1.0 / np.sqrt(H)
        self._params: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple] = {}
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H * D
            for d in range(D):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                shapes = {f"weight_ih_{sfx}": (G * H, in_size), f"weight_hh_{sfx}": (G * H, H)}
                if self.bias:
                    shapes[f"bias_ih_{sfx}"] = (G * H,)
                    shapes[f"bias_hh_{sfx}"] = (G * H,)
                for name, shape in shapes.items():
                    self._shapes[name] = shape
                    self._params[name] = _engine.aligned_copy(self._rng.uniform(-k, k, shape), self.dtype)

    # ------------------------------------------------------------------ properties
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def parameters(self) -> dict[str, np.ndarray]:
        """The live parameter arrays (PyTorch names); in-place updates are seen by the next call."""
        return dict(self._params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters, keyed by PyTorch's names."""
        return {k: v.copy() for k, v in self._params.items()}

    def _get_plan(self) -> _Plan:
        plan = self.__dict__.get("_plan")
        if plan is None:
            if self.__dict__.get("graph") is None:
                self.graph = trace_cell(self.cell, self.gates, self.num_states)
            plan = self._plan = _Plan(self.graph)
        return plan

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("graph", None)        # traced again on first use
        return state

    def freeze(self, precision=None):
        raise NotImplementedError("CustomRNN.freeze: frozen/low-precision custom cells are not implemented yet")

    def to_onnx(self, path, lengths: bool = False, initial_state: bool = False):
        raise NotImplementedError("CustomRNN.to_onnx: exporting custom cells is not implemented")

    def stream(self, batch: int):
        raise NotImplementedError("CustomRNN.stream: streaming custom cells is not implemented yet")

    # ------------------------------------------------------------------ forward
    def _prepare(self, x, hx, lengths):
        xs, unbatched = check_input(x, "x", self.dtype, self.input_size, self.batch_first)
        T, B, _ = xs.shape
        LD = self.num_layers * self.num_directions
        shape = (LD, B, self.hidden_size)
        nS = self.num_states
        if hx is None:
            h0 = [None] * nS
        elif nS == 1:
            if isinstance(hx, (tuple, list)) and len(hx) == 1:
                hx = hx[0]
            h0 = [check_state(hx, "hx", self.dtype, shape, unbatched)]
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != nS:
                raise ValueError(f"hx: expected a tuple of {nS} states (the cell's state structure)")
            h0 = [check_state(s, f"hx[{q}]", self.dtype, shape, unbatched) for q, s in enumerate(hx)]
        ln = check_lengths(lengths, T, B, unbatched)
        return xs, unbatched, h0, ln

    def _dir_weights(self, layer: int, d: int):
        sfx = f"l{layer}" + ("_reverse" if d else "")
        p = self._params
        GH = self.gates * self.hidden_size
        zb = np.zeros(GH, self.dtype)
        return (p[f"weight_ih_{sfx}"], p[f"weight_hh_{sfx}"], p.get(f"bias_ih_{sfx}", zb),
                p.get(f"bias_hh_{sfx}", zb))

    def _forward(self, x, hx=None, lengths=None, train: bool = False):
        """Run the layer (``forward`` / ``__call__``).

        Parameters
        ----------
        x : array_like (T, B, I), (B, T, I) with batch_first, or unbatched (T, I).
        hx : initial state(s): an (L*D, B, H) array, or a tuple of them for a cell with
            several states. Zeros when None.
        lengths : int array_like (B,), optional.
        train : keep what :meth:`backward` needs.

        Returns
        -------
        y, hx_n : outputs (T, B, D*H) and the final state(s), structured like hx.
        """
        xs, unbatched, h0, ln = self._prepare(x, hx, lengths)
        n = threads.enter_call()        # concurrent callers share the threads, never more
        threads.blas_enter()
        try:
            return self._forward_run(xs, unbatched, h0, ln, train, n)
        finally:
            threads.blas_exit()
            threads.leave_call(n, n > 1)

    def _forward_run(self, xs, unbatched, h0, ln, train, nthr):
        plan = self._get_plan()
        fwd = _compile(plan.fwd_src, "fwd", self.dtype)
        T, B, _ = xs.shape
        H, D, nS, dt = self.hidden_size, self.num_directions, self.num_states, self.dtype
        LD = self.num_layers * D
        if ln is None:
            perm = np.arange(B, dtype=np.int64)
            lp = np.full(B, T, np.int64)
        else:
            perm = np.argsort(-ln, kind="stable").astype(np.int64)
            lp = np.ascontiguousarray(ln[perm])
        nsteps = int(lp[0]) if B else 0
        hn = np.zeros((nS, LD, B, H), dt)
        runs = []
        inp = xs
        g = plan.g
        C = np.zeros((len(plan.cval), B, H), dt)
        for layer in range(self.num_layers):
            outs = []
            lruns = []
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh = self._dir_weights(layer, d)
                xp = _big_gemm(nthr)(np.ascontiguousarray(inp.reshape(T * B, -1)), w_ih.T)
                xp += b_ih
                xp = xp.reshape(T, B, -1)
                ns = nsteps + 1 if train else 1
                Sall = np.zeros((ns, nS, B, H), dt)
                for q in range(nS):
                    if h0[q] is not None:
                        Sall[0, q] = h0[q][k][perm]
                rt = nsteps if train else 1
                Ra = [np.zeros((rt, B, len(recs) * H), dt) for (_, _, recs) in g.groups]
                Va = {i: np.zeros((rt, B, H), dt) for i in plan.vsave}
                WT = [np.ascontiguousarray(w_hh[[r.arg * H + j for r in recs for j in range(H)]].T)
                      for (_, _, recs) in g.groups]
                y = np.zeros((T, B, H), dt)
                chunks = _row_chunks(lp, nthr)
                # the steps' products: one BLAS thread per row range, or all on one range
                threads.set_blas_threads(1 if len(chunks) > 1 else nthr)
                _run_chunks(fwd, chunks, xp, perm, lp, d, nsteps, int(train), Sall, C,
                            np.ascontiguousarray(b_hh), y, *Ra, *[Va[i] for i in plan.vsave], *WT)
                last = nsteps if train else 0
                hn[:, k][:, perm] = Sall[last]
                outs.append(y)
                if train:
                    run = _DirRun()
                    run.xp, run.S, run.R, run.V, run.inp = xp, Sall, Ra, Va, inp
                    run.perm, run.lp, run.nsteps = perm, lp, nsteps
                    lruns.append(run)
            runs.append(lruns)
            inp = np.concatenate(outs, axis=-1) if D > 1 else outs[0]
        if train:
            self._ctx = (runs, unbatched, self.batch_first, T, B)
        y = inp
        if unbatched:
            y = y[:, 0]
            hn = hn[:, :, 0]
        elif self.batch_first:
            y = y.transpose(1, 0, 2)
        return y, (hn[0] if nS == 1 else tuple(hn[q] for q in range(nS)))

    # ------------------------------------------------------------------ backward
    def _backward(self, dy, dhx_n=None):
        """Gradients of sum(y*dy) + sum(hx_n*dhx_n) after a ``forward(..., train=True)``.

        Returns ``(dx, dhx)`` shaped like x and hx; fills :attr:`grads`.
        """
        if self._ctx is None:
            raise RuntimeError("backward() needs a forward(..., train=True) call first")
        runs, unbatched, batch_first, T, B = self._ctx
        H, D, nS, dt, L = self.hidden_size, self.num_directions, self.num_states, self.dtype, self.num_layers
        LD = L * D
        F = D * H
        dys = _as_grad(dy, "dy", (T, F) if unbatched else ((B, T, F) if batch_first else (T, B, F)))
        if unbatched:
            dys = dys[:, None, :]
        elif batch_first:
            dys = dys.transpose(1, 0, 2)
        dys = np.ascontiguousarray(dys, dtype=dt)
        sshape = (LD, H) if unbatched else (LD, B, H)
        if dhx_n is None:
            dhn = [None] * nS
        elif nS == 1:
            if isinstance(dhx_n, (tuple, list)):
                raise TypeError("dhx_n: expected an array (the gradient of the final state), got a "
                                f"{type(dhx_n).__name__}")
            dhn = [dhx_n]
        else:
            if not isinstance(dhx_n, (tuple, list)) or len(dhx_n) != nS:
                raise TypeError(f"dhx_n: expected a tuple of {nS} arrays (entries may be None)")
            dhn = list(dhx_n)
        dhn = [None if a is None else np.asarray(_as_grad(a, f"dhx_n[{q}]" if nS > 1 else "dhx_n", sshape), dt)
               for q, a in enumerate(dhn)]
        if unbatched:
            dhn = [None if a is None else a[:, None, :] for a in dhn]
        n = threads.enter_call()
        threads.blas_enter()
        try:
            dx, dh0 = self._backward_run(runs, unbatched, batch_first, T, B, dys, dhn, n)
        finally:
            threads.blas_exit()
            threads.leave_call(n, n > 1)
        return dx, dh0

    def _backward_run(self, runs, unbatched, batch_first, T, B, dys, dhn, nthr):
        H, D, nS, dt, L = self.hidden_size, self.num_directions, self.num_states, self.dtype, self.num_layers
        LD = L * D
        plan = self._get_plan()
        bwd = _compile(plan.bwd_src, "bwd", self.dtype)
        g = plan.g
        grads: dict[str, np.ndarray] = {}
        dh0 = np.zeros((nS, LD, B, H), dt)
        dout = dys
        dinp = None
        nA = len(plan.cross)
        for layer in range(L - 1, -1, -1):
            dinp = None
            for d in range(D):
                k = layer * D + d
                run = runs[layer][d]
                w_ih, w_hh, _b_ih, b_hh = self._dir_weights(layer, d)
                perm, ns = run.perm, run.nsteps
                dS = np.zeros((nS, B, H), dt)
                for q in range(nS):
                    if dhn[q] is not None:
                        dS[q] = dhn[q][k][perm]
                dSp = np.zeros((nS, B, H), dt)
                A = np.zeros((nA, B, H), dt)
                dvb = np.zeros((B, H), dt)
                dxp = np.zeros(run.xp.shape, dt)
                dRa = [np.zeros_like(r) for r in run.R]
                Ws = [np.ascontiguousarray(w_hh[[r.arg * H + j for r in recs for j in range(H)]])
                      for (_, _, recs) in g.groups]
                dyd = np.ascontiguousarray(dout[..., d * H:(d + 1) * H])
                chunks = _row_chunks(run.lp, nthr)
                threads.set_blas_threads(1 if len(chunks) > 1 else nthr)
                _run_chunks(bwd, chunks, run.xp, perm, run.lp, d, ns, run.S, np.ascontiguousarray(b_hh), dyd, dS,
                            dSp, A, dxp, dvb, *run.R, *dRa, *Ws)
                dh0[:, k][:, perm] = dS
                mm = _big_gemm(nthr)
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                In = run.inp.shape[-1]
                x2 = np.ascontiguousarray(run.inp.reshape(T * B, In))
                dxp2 = dxp.reshape(T * B, -1)
                grads["weight_ih" + sfx] = mm(dxp2.T, x2).astype(dt, copy=False)
                dW = np.zeros(w_hh.shape, dt)
                dbh = np.zeros(w_hh.shape[0], np.float64)
                for gi, (_, v, recs) in enumerate(g.groups):
                    if ns == 0:
                        break
                    Vs = run.S[:ns, v.arg] if v.op == "state" else run.V[gi]
                    dR2 = dRa[gi].reshape(ns * B, -1)
                    part = mm(dR2.T, np.ascontiguousarray(Vs.reshape(ns * B, H)))
                    colsum = dR2.sum(axis=0, dtype=np.float64)
                    for q, r in enumerate(recs):
                        dW[r.arg * H:(r.arg + 1) * H] += part[q * H:(q + 1) * H]
                        dbh[r.arg * H:(r.arg + 1) * H] += colsum[q * H:(q + 1) * H]
                grads["weight_hh" + sfx] = dW
                if self.bias:
                    grads["bias_ih" + sfx] = dxp2.sum(axis=0, dtype=np.float64).astype(dt)
                    grads["bias_hh" + sfx] = dbh.astype(dt)
                part_in = mm(dxp2, w_ih).reshape(T, B, In)
                dinp = part_in if dinp is None else dinp + part_in
            dout = dinp
        self.grads = {k: grads[k] for k in self._params}
        dx = dinp
        if unbatched:
            dx = dx[:, 0]
            dh0 = dh0[:, :, 0]
        elif batch_first:
            dx = dx.transpose(1, 0, 2)
        return dx, (dh0[0] if nS == 1 else tuple(dh0[q] for q in range(nS)))

    def __repr__(self) -> str:
        name = getattr(self.cell, "__name__", type(self.cell).__name__)
        return (f"CustomRNN({self.input_size}, {self.hidden_size}, cell={name}, gates={self.gates}, "
                f"num_layers={self.num_layers}, bidirectional={self.bidirectional}, "
                f"batch_first={self.batch_first}, dtype={self.dtype.name})")


def _as_grad(a, name: str, shape: tuple) -> np.ndarray:
    arr = to_numpy(a, name)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    return arr
