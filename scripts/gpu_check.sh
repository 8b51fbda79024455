#!/usr/bin/env bash
# One-command GPU check on a fresh checkout (see scripts/gpu_check.py): uses the Python that already has torch,
# triton and ultralytics (a GPU image), else sets up .venv-gpu with this project installed; then runs the check.
#   bash scripts/gpu_check.sh            # on a CUDA machine, about 2-3 minutes
#   bash scripts/gpu_check.sh --dry-run  # anywhere: the same code on CPU through the Triton interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
if ! $py -c "import torch, triton, ultralytics" 2>/dev/null; then
    [ -d .venv-gpu ] || python3 -m venv .venv-gpu
    . .venv-gpu/bin/activate
    py=python
    pip install --quiet --disable-pip-version-check -e .
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec $py scripts/gpu_check.py "$@"
