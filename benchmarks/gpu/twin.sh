#!/usr/bin/env bash
# The GPU machine's Python stack on this CPU machine: what can be proven before a GPU is lent.
#
#   bash benchmarks/gpu/twin.sh [pytest args]      # default: the kernel tiers and the suite's dry run
#
# The lent H200 runs Python 3.12, torch 2.11.0 and Triton 3.6.0 (/work/.library/device/KINDS.md), and
# run.sh adds the wheels of .whl/ (benchmarks/gpu/fetch_wheels.sh) through /tmp/site. This script builds
# that stack in a virtual environment (${TMPDIR:-/tmp}/minillm-gpu-twin, reused; torch 2.11.0 from PyPI
# is its CUDA build, about 3.5 GB with its CUDA libraries) and runs, with the CPU:
#   1. benchmarks/gpu/run.sh --dry-run, exactly as the GPU machine would start it (PYTHON=the twin);
#   2. the kernel tests (Triton 3.6's interpreter: every kernel, TMA and split variants included) and
#      the suite's tests, or the pytest arguments given.
# numpy is held below 2.4 here: Triton 3.6's interpreter calls int() on 1-element arrays, which numpy
# 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"). The GPU machine's numpy
# (2.5) is no problem there: on a GPU the kernels are compiled, not interpreted; only its dry run
# cannot run minillm's norm kernels.
# Needs a Python 3.12 ($PYTHON312, pyenv's 3.12.x or python3.12) and the package index. Exit status: the dry
# run's when it fails, else pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="${TMPDIR:-/tmp}/minillm-gpu-twin"
is312() { "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
if [ -n "${PYTHON312:-}" ]; then
  is312 "$PYTHON312" || { echo "twin.sh: PYTHON312=$PYTHON312 is not a Python 3.12" >&2; exit 2; }
  PY312="$PYTHON312"
else
  PY312=""
  for py in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python python3.12; do
    is312 "$py" && { PY312="$py"; break; }
  done
  [ -n "$PY312" ] || { echo "twin.sh: no Python 3.12 found (set PYTHON312, or install python3.12 or pyenv's 3.12.x)" >&2; exit 2; }
fi
if [ -x "$VENV/bin/python" ] && ! is312 "$VENV/bin/python"; then
  echo "twin.sh: $VENV is not a Python 3.12 environment; remove it" >&2; exit 2
fi
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" sentencepiece pyarrow tqdm matplotlib pyyaml \
  pytest filelock safetensors transformers protobuf hypothesis requests click
bash benchmarks/gpu/fetch_wheels.sh >/dev/null   # the current list, as a GPU session would carry it
PYTHON="$VENV/bin/python" bash benchmarks/gpu/run.sh "${TMPDIR:-/tmp}/minillm-gpu-twin-out" --dry-run
[ $# -gt 0 ] || set -- tests/test_kernels_attention.py tests/test_kernels_norm.py tests/test_ops.py \
  tests/test_attention_build.py tests/test_gpu_suite.py
PYTHONPATH="/tmp/site:$ROOT" exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
