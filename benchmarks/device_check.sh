#!/usr/bin/env bash
# The accelerator check (benchmarks/device_check.py; docs/benchmarks.md,
# "Accelerator check"): on the lent GPU machine, installs the carried wheels
# of what jaxssl needs and that machine lacks, then runs every section and
# prints ONE JSON report (also written to $OUT when set).
#
#   bash benchmarks/device_check.sh fetch-wheels   # here, once: .whl/ (ignored)
#   bash benchmarks/device_check.sh                # there; run carry: [".whl"]
#   bash benchmarks/device_check.sh --dry-run      # tiny sizes on this CPU
#
# Other arguments go to `python -m benchmarks.device_check` (--only, --budget-s,
# --out). PYTHON picks the interpreter (default: python3, the one that holds
# jax on that machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
# Pure-Python requirements of the bench path that the accelerator image
# does not hold (its package list: ml_collections is missing; absl-py and
# PyYAML, its own requirements, are there). Pinned to setup.cfg's range.
WHEELS=(ml-collections==1.1.0)
SITE=/tmp/jaxssl-device-site

if [ "${1:-}" = fetch-wheels ]; then
  mkdir -p .whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  exit 0
fi

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "device_check: ml_collections is missing and .whl/ holds no wheel;" \
         "run 'bash benchmarks/device_check.sh fetch-wheels' where PyPI is" \
         "reachable and carry .whl" >&2
  fi
fi
exec "$PY" -m benchmarks.device_check "$@"
