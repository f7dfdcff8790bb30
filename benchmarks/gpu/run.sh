#!/usr/bin/env bash
# The GPU tier in one command (benchmarks/gpu/README.md): on one CUDA GPU, in under 6 minutes,
#   bash benchmarks/gpu/run.sh [OUT_DIR] [--full | --parts a,b | --dry-run]
# writes summary.md, results.json, PNGs and suite.log into OUT_DIR (default: $OUT when set, else
# benchmarks/measured/gpu/<device>/). Needs no network: wheels carried in .whl/ (made by
# benchmarks/gpu/fetch_wheels.sh) are installed into /tmp/site, and minillm runs from this checkout
# through PYTHONPATH (minillm/__init__.py binds kernels/ as minillm.kernels); nothing is pip-installed
# into the machine's Python.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true TRITON_DEFAULT_FP_FUSION=1
# autotuning results go to Triton's disk cache too, so the parts (separate processes) tune each shape once
export TRITON_CACHE_AUTOTUNING=1
unset TRITON_INTERPRET

if ls .whl/*.whl >/dev/null 2>&1; then
  # the device README's offline install: one version of each wheel, no index, no dependency resolution
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "run.sh: installing .whl/ into /tmp/site failed" >&2; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# what the suite will use, in the log (a missing module shows here, before any part starts)
"$PY" - <<'PY' || true
import importlib
for m in ("torch", "triton", "numpy", "hydra", "omegaconf", "zstandard", "sentencepiece", "google.protobuf", "wandb",
          "minillm", "minillm.kernels"):
    try:
        mod = importlib.import_module(m)
        print(f"run.sh: {m} {getattr(mod, '__version__', '')} from {getattr(mod, '__file__', '?')}")
    except Exception as e:
        print(f"run.sh: {m} MISSING ({type(e).__name__}: {e})")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader || true

exec "$PY" benchmarks/gpu/suite.py "$@"
