#!/usr/bin/env bash
# The accelerator check in one command (one GPU, no network, under 8 minutes):
# maml_jax (conv_impl="lax", batching="vmap") against learn2learn and higher on
# the Omniglot q15 workload and the sinusoid (tasks/s, compile time, memory), and
# MAML Omniglot 5-way 1-shot trained for 4 minutes then tested. One JSON file.
#
#   bash benchmarks/accelerator_check.sh [--smoke] [--out FILE] [...]
#
# Options go to benchmarks/accelerator_check.py (--help). Before it runs, the peer
# wheels of benchmarks/build_peer_wheels.sh (PEER_WHEELS, default
# benchmarks/peers/wheels) are installed, offline and without dependencies, into
# PEER_SITE (default /tmp/maml_jax_peer_site), put first on PYTHONPATH; without
# wheels, peers that are not already importable are skipped with a note. PYTHON
# (default python3) is the interpreter holding JAX and PyTorch. Omniglot's zips:
# --omniglot-dir, MAML_JAX_OMNIGLOT_DIR, shared/data/omniglot or .omniglot/ in the
# repository, or ../shared/data/omniglot beside it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${PEER_WHEELS:-$ROOT/benchmarks/peers/wheels}"
SITE="${PEER_SITE:-/tmp/maml_jax_peer_site}"

if compgen -G "$WHEELS/*.whl" >/dev/null &&
  ! "$PY" -c "import learn2learn, higher" >/dev/null 2>&1; then
  names=()
  for wheel in "$WHEELS"/*.whl; do
    names+=("$(basename "$wheel" | cut -d- -f1)")
  done
  echo ">> installing ${names[*]} from $WHEELS into $SITE" >&2
  "$PY" -m pip install --quiet --no-index --no-deps --no-compile \
    --disable-pip-version-check --find-links "$WHEELS" --target "$SITE" \
    --upgrade "${names[@]}" ||
    echo "   peer wheels did not install; the peers will be skipped" >&2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PY" -m benchmarks.accelerator_check "$@"
