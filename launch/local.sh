#!/usr/bin/env bash
# Set-up and local runs from a fresh clone: the README's two commands.
#
#   bash launch/local.sh quickstart   # SimCLR on offline Fashion-MNIST, then linear eval
#   bash launch/local.sh test         # the test suite (what CI runs)
#
# Both first make sure of (1) the Debian package dataset-fashion-mnist (the
# real offline data; installed with apt-get as root or through sudo) and
# (2) a virtualenv in .venv (or $JAXSSL_VENV) with jaxssl installed from
# setup.cfg, reinstalled only when setup.cfg changes. Extra arguments go to
# jaxssl.main (quickstart) or pytest (test).
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
VENV="${JAXSSL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

ensure_fashion_mnist() {
  if [ -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then return; fi
  echo "Installing the Debian package dataset-fashion-mnist (offline Fashion-MNIST)..."
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then sudo="sudo"; else
      echo "error: Fashion-MNIST is missing and this user cannot install it;" \
           "run: sudo apt-get install -y dataset-fashion-mnist" >&2
      exit 1
    fi
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist
}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating the virtualenv $VENV..."
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.jaxssl-setup-stamp"
  local want
  want="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "Installing jaxssl and its dependencies into $VENV (a few minutes)..."
    local log="$VENV/jaxssl-install.log"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
           "$VENV/bin/python" -m pip install -e '.[test]'; } >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      echo "error: installing jaxssl failed; the full log is $log" >&2
      exit 1
    fi
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  quickstart)
    ensure_fashion_mnist
    ensure_venv
    exec "$VENV/bin/python" -m jaxssl.main \
      --config=configs/simclr_fashion_mnist.py \
      --workdir="${JAXSSL_WORKDIR:-workdirs/quickstart}" "$@"
    ;;
  test)
    ensure_fashion_mnist
    ensure_venv
    exec "$VENV/bin/python" -m pytest -n "${JAXSSL_TEST_WORKERS:-2}" "$@"
    ;;
  setup)
    ensure_fashion_mnist
    ensure_venv
    ;;
  *)
    echo "usage: bash launch/local.sh quickstart|test|setup [args...]" >&2
    exit 2
    ;;
esac
