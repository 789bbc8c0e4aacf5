"""Command line: ``python -m rnnfast {bench,info,tune}`` (also installed as ``rnnfast``).

* ``bench``: rnnfast against its NumPy reference backend, PyTorch and ONNX Runtime on the
  standard workloads (see :mod:`rnnfast.bench`).
* ``info``: version, backends, threads, threading layer, BLAS and CPU features (see
  :mod:`rnnfast.info`).
* ``tune``: measure this machine's step forms again and cache them (see
  :mod:`rnnfast.tuning`).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    from . import bench, info
    ap = argparse.ArgumentParser(prog="python -m rnnfast", description="rnnfast command line")
    sub = ap.add_subparsers(dest="command", metavar="{bench,info,tune}")
    pb = sub.add_parser("bench", help="time rnnfast against the reference, PyTorch and ONNX Runtime",
                        description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(pb)
    pi = sub.add_parser("info", help="version, backends, threads, BLAS and CPU features",
                        description=info.__doc__.split("\n\n")[0])
    info.add_arguments(pi)
    pt = sub.add_parser("tune", help="measure this machine's step forms again and cache them",
                        description="Measure the Cython kernel's host-dependent step forms at the given "
                                    "thread counts and replace the cached profile (rnnfast/tuning.py).")
    pt.add_argument("--threads", default="", help="comma-separated thread counts (default: rnnfast's)")
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        if args.command == "tune":
            return _tune(args)
        return bench.run(args) if args.command == "bench" else info.run(args)
    except BrokenPipeError:          # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _tune(args) -> int:
    import rnnfast

    from . import tuning
    if not tuning.enabled():
        print("rnnfast tune: RNNFAST_TUNE=0 turns measuring off; unset it to tune", file=sys.stderr)
        return 2
    counts = [int(v) for v in args.threads.split(",") if v.strip()] or [rnnfast.get_num_threads()]
    old = rnnfast.get_num_threads()
    try:
        for n in counts:
            rnnfast.set_num_threads(n)
            p = tuning.retune(n)
            forms = ", ".join(f"{k} {p[k]}" for k in tuning.DEFAULTS)
            meas = ", ".join(f"{k} {v:.3f}" for k, v in p["measured"].items())
            print(f"threads {n}: {forms}  (time ratios form on / off: {meas}; {p['seconds']} s)")
    finally:
        rnnfast.set_num_threads(old)
    print(f"cached in {tuning.cache_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
