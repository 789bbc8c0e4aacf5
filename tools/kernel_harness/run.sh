#!/usr/bin/env bash
# Build and run the C micro-benchmarks of the kernel headers (kernels/rf_*.h) with the
# flags setup.py uses. Timings only (not tests); figures on a shared 2-core machine move
# 10-30 % between runs: compare alternating runs of two builds, never single runs.
#
#   bash tools/kernel_harness/run.sh            # all six, default shapes
#   step_proj H n N        pack, projection of N rows, fused step of n rows (1 thread, all panels)
#   layer_2threads H B T P I   a whole LSTM layer: pack + projection + T fused steps on P threads
#   step_panels B          one 2-thread fused step in parts: first panel, other panels, barrier wait
#   rowdot m K             one input row x m weight rows of K: rf_rowdot1 (forward, alternating) vs rf_rowdot_blk
#   pool m K               two halves of a call: an OpenMP region vs rf_pool's helper thread vs one thread
#   after_pause B          per-step compute / barrier wait of a 2-thread LSTM recurrence after 0.25 s idle
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}/rnnfast_kernel_harness"
mkdir -p "$out"
FL="-O3 -falign-loops=64 -fwrapv -fno-math-errno -fno-trapping-math -fopenmp -march=${RNNFAST_MARCH:-native} -mprefer-vector-width=512"
for p in step_proj layer_2threads step_panels rowdot pool after_pause; do
    gcc $FL -I"$here/../../kernels" "$here/$p.c" -o "$out/$p" -lmvec -lm
done
"$out/step_proj" 256 8 800
"$out/step_proj" 512 64 6400
"$out/layer_2threads" 256 8 100 2 256 | tail -2
"$out/step_panels" 8 | tail -1
"$out/step_panels" 16 | tail -1
"$out/rowdot" 512 256
"$out/rowdot" 1024 256
"$out/pool" 2048 256
"$out/pool" 64 64
"$out/after_pause" 8 | head -12
