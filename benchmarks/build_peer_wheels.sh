#!/usr/bin/env bash
# Builds the wheels the accelerator check installs on a machine with no network:
# learn2learn 0.2.0, higher 0.2.1 and the packages `import learn2learn` needs that
# an image with PyTorch, JAX and SciPy lacks (gym 0.26.2, gym_notices).
#
#   bash benchmarks/build_peer_wheels.sh [DIR]    # default benchmarks/peers/wheels
#
# higher, gym and gym_notices are pure Python (py3-none-any): `pip wheel --no-deps`
# builds them for any Python. learn2learn has C extensions (learn2learn/data/*.pyx)
# and PyPI has no wheel of it for recent Pythons; its sdist carries C files made by
# an old Cython that do not compile on Python >= 3.11, so a plain
# `pip wheel learn2learn` fails. This script regenerates them with `cython -3`
# (as benchmarks/peers/setup.sh does) and builds the wheel with a C compiler (gcc)
# for the Python of the target machine: PEER_WHEEL_PYTHON (default python3.12,
# found on PATH or under pyenv; the H200 image runs Python 3.12). The wheel is
# tagged for that Python (cp312-cp312-linux_x86_64) and needs glibc as new as
# this machine's. learn2learn's other requirements (gsutil, qpth, torchvision)
# are not needed by learn2learn.algorithms, which is all the benchmark uses, and
# the check installs every wheel with --no-deps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(mkdir -p "${1:-$ROOT/benchmarks/peers/wheels}" && cd "${1:-$ROOT/benchmarks/peers/wheels}" && pwd)"
L2L_VERSION=0.2.0
HIGHER_VERSION=0.2.1
GYM_VERSION=0.26.2
GYM_NOTICES_VERSION=0.0.8

find_python() {
  if [[ -n "${PEER_WHEEL_PYTHON:-}" ]]; then echo "$PEER_WHEEL_PYTHON"; return; fi
  local pyenv_root py
  pyenv_root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  # A pyenv shim can be on PATH without a 3.12 selected: try each until one runs.
  for py in "$(command -v python3.12 || true)" \
    "$pyenv_root"/versions/3.12*/bin/python3.12; do
    if [[ -x "$py" ]] && "$py" -c "import sys; assert sys.version_info[:2] == (3, 12)" \
      >/dev/null 2>&1; then
      echo "$py"
      return
    fi
  done
  echo "no python3.12 found; set PEER_WHEEL_PYTHON to the target machine's Python" >&2
  exit 1
}
PY="$(find_python)"
echo ">> building for $("$PY" --version) ($PY) into $DIR"

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"$PY" -m venv "$BUILD/venv"
VPY="$BUILD/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip setuptools wheel "cython>=3"

echo ">> pure-Python wheels: higher, gym, gym_notices"
"$VPY" -m pip wheel --quiet --no-deps -w "$DIR" "higher==$HIGHER_VERSION" \
  "gym==$GYM_VERSION" "gym_notices==$GYM_NOTICES_VERSION"

echo ">> learn2learn $L2L_VERSION from its sdist, re-cythonized"
"$VPY" -m pip download --quiet --no-deps --no-build-isolation \
  --no-binary learn2learn "learn2learn==$L2L_VERSION" -d "$BUILD"
tar -xzf "$BUILD/learn2learn-$L2L_VERSION.tar.gz" -C "$BUILD"
SRC="$BUILD/learn2learn-$L2L_VERSION"
for pyx in "$SRC"/learn2learn/data/*.pyx; do
  "$BUILD/venv/bin/cython" -3 "$pyx"
done
# Only learn2learn.vision imports torchvision; make that import optional so the
# wheel imports against any torch (algorithms/, nn/, utils/ are unchanged).
"$VPY" "$ROOT/benchmarks/peers/_patch_l2l.py" "$SRC/learn2learn/__init__.py"
"$VPY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIR" "$SRC"

echo ">> wheels in $DIR"
ls -l "$DIR"
