#!/usr/bin/env bash
# A/B of two builds in alternating processes: bash tools/ab/ab.sh OLD_TREE WORKLOADS [ROUNDS]
# OLD_TREE: another checkout with its extensions built in place (python setup.py
# build_ext --inplace); WORKLOADS: comma-separated names of workloads.py. The machine is
# noisy: compare the medians of several rounds, never one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# With this tree installed editable, rnnfast.kernels resolves to the installed tree's
# kernels/ (pkgutil.extend_path); a link inside the old tree's package makes it load its own.
if [ -d "$1/kernels" ] && [ ! -e "$1/rnnfast/kernels" ]; then
  ln -s ../kernels "$1/rnnfast/kernels"
fi
cd /tmp
for r in $(seq 1 "${3:-4}"); do
  echo "old: $(PYTHONPATH="$1" python "$here/workloads.py" "$2")"
  echo "new: $(PYTHONPATH="$here/../.." python "$here/workloads.py" "$2")"
done
