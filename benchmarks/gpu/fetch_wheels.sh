#!/usr/bin/env bash
# Download, on a machine with network, the wheels minillm needs that the GPU machine lacks, into .whl/
# in the repository root (git-ignored through .git/info/exclude, never committed). run.sh installs them
# there with `pip install --no-index --no-deps --target /tmp/site` (that machine has no network).
#
#   bash benchmarks/gpu/fetch_wheels.sh          # then pass carry: [".whl"] to the device tool
#
# What is missing there was read off /work/.library/device/KINDS.md's package list (nvidia-h200, read
# 2026-11-17), against pyproject.toml's runtime dependencies and what they import:
#   hydra-core, omegaconf, antlr4-python3-runtime   train.py / sample.py (Hydra); pure Python
#   zstandard                                        minillm/data/formats.py imports it at module level
#   wandb (+ pydantic, pydantic-core, annotated-types, typing-inspection, gitpython, gitdb, smmap,
#          sentry-sdk, platformdirs)
#                                                    imported only when logger.wandb.mode != disabled;
#                                                    carried so that a wandb run can work there too
#                                                    (0.28: protobuf < 8; 0.19.11 did not import with
#                                                    protobuf 7, seen in benchmarks/gpu/twin.sh; 0.29 on
#                                                    adds OpenTelemetry's packages)
#   pytest-xdist, execnet                            pyproject's pytest addopts name -n (parallel
#                                                    workers): without the plugin a hand-run pytest there
#                                                    fails to parse them (the suite passes -o addopts=)
# Already there (not fetched): torch, triton, numpy, sentencepiece, pyarrow, tqdm, matplotlib, pyyaml,
# requests, click, protobuf, typing-extensions, packaging, urllib3, certifi, pytest.
# Versions are pinned (one version of each, as the device README asks) and satisfy each other's pins:
# hydra-core 1.3.2 wants omegaconf <2.4 and antlr4 4.9.*; pydantic 2.11.7 wants pydantic-core 2.33.2.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"

# keep .whl/ out of git (the device tool still carries it when `carry` names it)
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"

PURE=(hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
      pydantic==2.11.7 annotated-types==0.7.0 typing-inspection==0.4.1
      gitpython==3.1.44 gitdb==4.0.12 smmap==5.0.2 sentry-sdk==2.32.0 platformdirs==4.3.8
      pytest-xdist==3.8.0 execnet==2.1.2)
BINARY=(zstandard==0.23.0 pydantic-core==2.33.2 wandb==0.28.0)
ALL=("${PURE[@]}" "${BINARY[@]}")

# only this list: a wheel left from an earlier list (another version of a package) would make run.sh's
# install fail (pip refuses two versions of one package)
rm -f .whl/*.whl
mkdir -p .whl
# antlr4-python3-runtime 4.9.3 is published as an sdist only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
for spec in "${ALL[@]}"; do
  [ "${spec%%==*}" = antlr4-python3-runtime ] && continue
  # the device README's command: CPython 3.12 wheels for manylinux x86-64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
du -sh .whl
