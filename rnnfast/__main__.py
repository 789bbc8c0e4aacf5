"""Command line: ``python -m rnnfast {bench,info}`` (also installed as ``rnnfast``).

* ``bench``: rnnfast against its NumPy reference backend, PyTorch and ONNX Runtime on the
  standard workloads (see :mod:`rnnfast.bench`).
* ``info``: version, backends, threads, threading layer, BLAS and CPU features (see
  :mod:`rnnfast.info`).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    from . import bench, info
    ap = argparse.ArgumentParser(prog="python -m rnnfast", description="rnnfast command line")
    sub = ap.add_subparsers(dest="command", metavar="{bench,info}")
    pb = sub.add_parser("bench", help="time rnnfast against the reference, PyTorch and ONNX Runtime",
                        description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(pb)
    pi = sub.add_parser("info", help="version, backends, threads, BLAS and CPU features",
                        description=info.__doc__.split("\n\n")[0])
    info.add_arguments(pi)
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return bench.run(args) if args.command == "bench" else info.run(args)
    except BrokenPipeError:          # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
