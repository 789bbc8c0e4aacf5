#!/usr/bin/env python3
"""Fail when a micro-kernel's hot loop keeps vectors on the stack, under any -march target.

The kernels of kernels/rf_*.h keep their accumulators in vector registers only if the
compiler allocates them so; under some tunings GCC demoted an accumulator array to the
stack (``vfmadd213ps 0x200(%rsp)`` in the GEMM's k loop for ``-march=rocketlake``), and
the GEMM ran at a quarter of its speed. This check compiles ``kernels.c`` (every hot
kernel as an out-of-line function, as the Cython modules call them) with setup.py's
flags for each target, disassembles it, and reports every loop of those
functions that loads or stores a vector register from a stack slot (an operand based
on %rsp or %rbp with an xmm/ymm/zmm register in the same instruction).

Usage:  python tools/spill_check/spill_check.py [--cc gcc] [--march T[,T...]] [-v]
Exit status 1 when a spill is found, 0 otherwise. A target the compiler does not know
is reported as skipped (GCC 12 has no znver4); at least one target must compile.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERNELS = os.path.join(ROOT, "kernels")

TARGETS = [
    "x86-64-v3", "haswell", "skylake-avx512", "cascadelake", "icelake-server", "rocketlake",
    "tigerlake", "sapphirerapids", "x86-64-v4", "znver3", "znver4", "znver5",
]
# The flags of setup.py's kernels (Python's own CFLAGS add -fwrapv); the ISA level's
# extra flags are added per target by isa_flags().
BASE_FLAGS = ["-O3", "-fwrapv", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
              "-fopenmp", "-falign-loops=64"]

_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_FUNC = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
_JUMP = re.compile(r"^j[a-z]+$")
_STACK_VEC = re.compile(r"\(%r[sb]p[,)].*%[xyz]mm\d+|%[xyz]mm\d+.*\(%r[sb]p[,)]")


def compile_target(cc: str, march: str, out: str, extra: list[str], kernels: str = KERNELS) -> tuple[bool, str]:
    cmd = [cc, *BASE_FLAGS, f"-march={march}", *extra, f"-I{kernels}", "-c",
           os.path.join(HERE, "kernels.c"), "-o", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode == 0, p.stderr


def parse(objdump_text: str) -> dict[str, list[tuple[int, str, str]]]:
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in objdump_text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def _blocks(insns):
    """Basic blocks of a function: (start index, end index) pairs and successor lists."""
    addrs = {a: i for i, (a, _, _) in enumerate(insns)}
    lead = {0}
    for i, (_a, op, ar) in enumerate(insns):
        if _JUMP.match(op) or op.startswith("ret"):
            if i + 1 < len(insns):
                lead.add(i + 1)
            t = _target(ar)
            if t in addrs:
                lead.add(addrs[t])
    starts = sorted(lead)
    bounds = [(s, (starts[k + 1] if k + 1 < len(starts) else len(insns)) - 1)
              for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(bounds)}
    succ = []
    for _s, e in bounds:
        _, op, ar = insns[e]
        out = []
        t = _target(ar) if _JUMP.match(op) else None
        if t in addrs and addrs[t] in block_of:
            out.append(block_of[addrs[t]])
        if not (op == "jmp" or op.startswith("ret")) and e + 1 < len(insns):
            out.append(block_of[e + 1])
        succ.append(out)
    return bounds, succ


def _target(args: str):
    t = args.split()[0] if args else ""
    try:
        return int(t, 16)
    except ValueError:
        return None


def _sccs(nodes: set[int], succ) -> list[set[int]]:
    """Strongly connected components with a cycle (Tarjan, iterative) of a subgraph."""
    index, low, on, stack, out, n = {}, {}, set(), [], [], [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter([s for s in succ[root] if s in nodes]))]
        index[root] = low[root] = n[0]
        n[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = n[0]
                    n[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter([s for s in succ[w] if s in nodes])))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in succ[v]:
                        out.append(comp)
    return out


def loops(insns):
    """Each loop of the control-flow graph (a strongly connected component, nested ones
    found by removing the header: the block entered from outside, or the first) as the
    instruction indices of its own blocks, those of loops nested in it left out."""
    if not insns:
        return []
    bounds, succ = _blocks(insns)
    out = []
    todo = _sccs(set(range(len(bounds))), succ)
    while todo:
        comp = todo.pop()
        entered = {b for b in comp for p in range(len(bounds)) if p not in comp and b in succ[p]}
        header = min(entered) if entered else min(comp)
        inner = _sccs(comp - {header}, succ)
        todo.extend(inner)
        own = comp - set().union(*inner) if inner else comp
        out.append(sorted(i for b in own for i in range(bounds[b][0], bounds[b][1] + 1)))
    return out


_STORE_STACK = re.compile(r"%[xyz]mm\d+,\s*-?(0x[0-9a-f]+)?\(%r[sb]p[,)]")


# The micro-kernels (register-blocked products): each block shape is an out-of-line
# function (rf_mk_<rows>_<vectors>_f, rf_gemm_blk_*, rft_mk_*, rf_mkh_*), and the
# row-dot kernels are inlined into their chk_ wrappers. Other loops with FMAs (the gate
# math inlined into the fused step) are reported, not failed.
# (rf_gemm_rows_*, rf_mk_[fd], rft_mm_*: where the blocks were inlined before, commit history)
MICRO = re.compile(r"^(rf_mk_\d|rf_mk_[fd]$|rf_mkh_|rf_gemm_blk_|rf_gemm_rows_|rft_mk_|rft_mm_"
                   r"|rf_rowdot|chk_rowdot|chk_mm_|chk_gemm_|rf_lowp_gemm_vnni|rf_lowp_gemm_bf16)")
# the products' multiply-adds: fp32 FMAs, and int8 / bf16 dot products (rf_lowp_gemm.h)
_MADD = ("vfmadd", "vfnmadd", "vpdpbusd", "vdpbf16ps")


def spills(funcs, micro: bool = True) -> list[str]:
    """Loops with 4 or more FMAs that store a vector register to a stack slot (a register
    demoted to memory: the loop reads it back); loads alone (a tile the kernel wrote
    before the loop) are not spills. micro: the micro-kernels' loops, else the others."""
    found = []
    for name, insns in funcs.items():
        base = name.split(".")[0]
        if not (base.startswith(("chk_", "rf_", "rft_"))) or bool(MICRO.match(base)) != micro:
            continue
        for idx in loops(insns):
            body = [insns[i] for i in idx]
            if sum(1 for _, op, _ in body if op.startswith(_MADD)) < 4:
                continue        # not a product's k loop (copies, packing, partial tiles)
            st = [(a, op, ar) for a, op, ar in body if _STORE_STACK.search(ar) and not op.startswith("vpbroadcast")]
            if st:
                ld = sum(1 for a, op, ar in body if _STACK_VEC.search(ar)) - len(st)
                a, op, ar = st[0]
                found.append(f"{name}: loop at {body[0][0]:#x} ({len(body)} insns): {len(st)} vector "
                             f"stores to the stack, {ld} other stack operands, e.g. {a:#x} {op} {ar}")
    return found


# The float gate math's exp / tanh / sigmoid (rf_gates.h) are only vectorised inlined: a
# call of one is a gate loop that went scalar (commit 6ea1db3)
_SCALAR_MATH_CALL = re.compile(r"^\s*[0-9a-f]+:\s+call\S*\s+[0-9a-f]+\s+<(rf_expf|rf_tanhf|rf_sigmoid_f)[>.@]", re.M)


def scalar_math_calls(objdump_text: str) -> list[str]:
    """One line per out-of-line call of the float gate math."""
    n = len(_SCALAR_MATH_CALL.findall(objdump_text))
    return [f"{n} out-of-line calls of rf_expf / rf_tanhf / rf_sigmoid_f (gate math not vectorised)"] if n else []


def isa_flags(march: str) -> list[str]:
    """setup.py's extra flags for a target: 512-bit vectors where it has AVX-512."""
    return ["-mprefer-vector-width=512"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", default=os.environ.get("CC", "gcc"))
    ap.add_argument("--march", default=",".join(TARGETS))
    ap.add_argument("--define", action="append", default=[], help="extra -D for the kernels")
    ap.add_argument("--kernels", default=KERNELS, help="folder of the rf_*.h headers (default: this tree's)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if shutil.which(a.cc) is None or shutil.which("objdump") is None:
        print(f"spill_check: needs {a.cc} and objdump", file=sys.stderr)
        return 2
    n_ok, n_bad, skipped = 0, 0, []
    marches = a.march.split(",")
    with tempfile.TemporaryDirectory() as d:
        # the targets compile at once, one per core (each compile is one process); the
        # reports below keep the order of the targets
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
            built = list(ex.map(lambda m: compile_target(a.cc, m, os.path.join(d, f"{m}.o"),
                                                         isa_flags(m) + [f"-D{x}" for x in a.define], a.kernels),
                                marches))
        for march, (ok, err) in zip(marches, built):
            obj = os.path.join(d, f"{march}.o")
            if not ok:
                if "march" in err and ("bad value" in err or "unknown" in err or "not recognized" in err):
                    skipped.append(march)
                    continue
                print(f"spill_check: {march}: compile failed\n{err}", file=sys.stderr)
                return 2
            dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", obj],
                                 capture_output=True, text=True, check=True).stdout
            funcs = parse(dis)
            found = spills(funcs) + scalar_math_calls(dis)
            other = spills(funcs, micro=False)
            n_ok += 1
            if found:
                n_bad += 1
                print(f"FAIL {march}: {len(found)} problems (hot loops keeping vectors on the stack, "
                      "scalar gate-math calls)")
                for f in found if a.verbose else found[:6]:
                    print("    " + f)
            else:
                print(f"ok   {march}: micro-kernels ({sum(1 for f in funcs if MICRO.match(f))} functions)"
                      f" keep their vectors in registers"
                      + (f"; {len(other)} gate-math loops have stack traffic" if other else ""))
            if a.verbose:
                for f in other:
                    print("    (gate math) " + f)
    if skipped:
        print(f"skipped (unknown to {a.cc}): {', '.join(skipped)}")
    if n_ok == 0:
        print("spill_check: no target compiled", file=sys.stderr)
        return 2
    print(f"spill_check: {n_ok - n_bad}/{n_ok} targets clean")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
