#!/usr/bin/env bash
# A/B of two builds in alternating processes: bash tools/ab/ab.sh OLD_TREE WORKLOADS [ROUNDS]
# OLD_TREE: another checkout with its extensions built in place (python setup.py
# build_ext --inplace); WORKLOADS: comma-separated names of workloads.py. The machine is
# noisy: compare the medians of several rounds, never one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd /tmp
for r in $(seq 1 "${3:-4}"); do
  echo "old: $(PYTHONPATH="$1" python "$here/workloads.py" "$2")"
  echo "new: $(PYTHONPATH="$here/../.." python "$here/workloads.py" "$2")"
done
