#!/usr/bin/env bash
# The build report (python -m minillm.kernels.build_report) compiled by another Triton release, in a
# throwaway virtual environment: registers, spills and shared memory as a GPU machine with that Triton
# would see them. Releases differ: Triton 3.6 (the lent GPU machine's) spills in configurations that
# 3.9 builds cleanly, so each autotune list's head-dim maxima are checked with both.
#
#   bash benchmarks/build_report_triton.sh 3.6.0        # -> benchmarks/measured/build_report/triton-3.6.json
#   bash benchmarks/build_report_triton.sh 3.9.0 /tmp/r.json --only attn_fwd
#
# Needs the package index (pip installs torch==2.13.0, the given triton and numpy into
# ${TMPDIR:-/tmp}/minillm-triton-VERSION, reused on the next run). Prints the report's table; exits
# with the report's status (1 when a configuration fails to compile, spills or overflows shared memory).
set -euo pipefail
VERSION="${1:?usage: bash benchmarks/build_report_triton.sh TRITON_VERSION [JSON_OUT] [build_report options]}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MINOR="$(echo "$VERSION" | cut -d. -f1,2)"
OUT="${2:-$ROOT/benchmarks/measured/build_report/triton-$MINOR.json}"
shift $(( $# >= 2 ? 2 : 1 ))
VENV="${TMPDIR:-/tmp}/minillm-triton-$VERSION"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first and pinned, so pip keeps its CPU build; triton after it, at the version asked for
"$VENV/bin/pip" install -q torch==2.13.0 numpy
"$VENV/bin/pip" install -q "triton==$VERSION"
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
got="$("$VENV/bin/python" -c 'import triton; print(triton.__version__)')"
if [ "$got" != "$VERSION" ]; then
  echo "error: asked for triton==$VERSION, the environment has $got" >&2
  exit 2
fi
mkdir -p "$(dirname "$OUT")"
cd "$ROOT"
exec "$VENV/bin/python" -m minillm.kernels.build_report --json "$OUT" -q "$@"
