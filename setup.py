"""Build the Cython kernels in kernels/*.pyx as rnnfast.kernels.*.

OpenMP flags are used only when a probe compile with them succeeds; otherwise the
extensions build serially (the ``#ifdef _OPENMP`` shim in kernels/rf_gates.h).
``RNNFAST_MARCH`` picks the -march flag (default ``native``; set it empty for a
portable build).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler_accepts(flags: list[str]) -> bool:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    if shutil.which(cc) is None:
        return False
    src = "#include <math.h>\nint main(void){ volatile float x = 1.0f; return (int)expf(x) - 2; }\n"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "probe.c")
        with open(path, "w") as fh:
            fh.write(src)
        cmd = [cc, *flags, path, "-o", os.path.join(d, "probe"), "-lm"]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
link_args: list[str] = []
march = os.environ.get("RNNFAST_MARCH", "native")
if march and _compiler_accepts([f"-march={march}"]):
    compile_args.append(f"-march={march}")
    # 512-bit vectors where the CPU has them (GCC's tuning for recent Xeons prefers 256):
    # the gate math then calls libmvec's 16-wide exp/tanh (measured 207 -> 122 us per
    # LSTM step at B=64, H=512).
    if _compiler_accepts([f"-march={march}", "-mprefer-vector-width=512"]):
        compile_args.append("-mprefer-vector-width=512")
# Hot loops start on 64-byte boundaries: the micro-kernel's k loop is a few dozen
# instructions, and where it fell across fetch blocks changed with unrelated edits
# (Zen 5, GCC 12: B=16 LSTM steps 10 % slower after a change to the gate code only;
# with 64-byte alignment the B=16 layer took 42.1-42.5 ms against 46.7-47.6, one thread).
if _compiler_accepts(["-falign-loops=64"]):
    compile_args.append("-falign-loops=64")
if sys.platform != "win32" and _compiler_accepts(["-fopenmp"]):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
else:
    print("rnnfast: OpenMP not available, building serial kernels", file=sys.stderr)
if _compiler_accepts(["-lmvec"]):
    link_args.append("-lmvec")

extensions = [
    Extension(
        f"rnnfast.kernels.{os.path.splitext(os.path.basename(p))[0]}",
        [p],
        depends=sorted(glob.glob("kernels/*.h") + glob.glob("kernels/*.pxi")),
        include_dirs=[np.get_include(), "kernels"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for p in sorted(glob.glob("kernels/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
