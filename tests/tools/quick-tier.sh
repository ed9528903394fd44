#!/bin/bash
# The root-free tier (`make test-quick`): every test not marked `root`, in under a
# minute. Started as root, it drops to uid 65534 with no capabilities first, to prove
# the tier needs no privilege. The venv's interpreter may be one that user cannot run
# (pyenv's under /root, say): then a venv of Debian's /usr/bin/python3 is made once,
# in /var/tmp, and used instead.
#
# The tests run in pytest-xdist workers, one per CPU (at least 2: much of the tier
# waits on child processes and sockets, not on the CPU; at most 8), a file per worker
# at a time so that module fixtures (a Prometheus, kustomize builds) start once.
# PLANEWATCH_QUICK_WORKERS=0 runs it in one process. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
CPUS=$(nproc)
WORKERS=${PLANEWATCH_QUICK_WORKERS:-$(( CPUS < 2 ? 2 : CPUS > 8 ? 8 : CPUS ))}
PYTEST=(-m pytest -q -p no:cacheprovider -m "not root" -n "$WORKERS" --dist loadfile tests "$@")
if [ "$(id -u)" != 0 ]; then
  exec env PLANEWATCH_QUICK=1 "$BIN/python" "${PYTEST[@]}"
fi
DROP=(setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all
      env HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PLANEWATCH_QUICK=1)
PY=$BIN/python
if ! "${DROP[@]}" "$PY" -c 'import collector, pytest' 2>/dev/null; then
  Q=${PLANEWATCH_QUICK_VENV:-/var/tmp/planewatch-quick-venv}
  if [ ! -f "$Q/.installed" ] || [ pyproject.toml -nt "$Q/.installed" ]; then
    echo ">> $PY cannot run as uid 65534: a venv of /usr/bin/python3 in $Q"
    rm -rf "$Q"
    /usr/bin/python3 -m venv "$Q"
    "$Q/bin/pip" install -q --upgrade pip >/dev/null
    "$Q/bin/pip" install -q -e '.[test]'
    touch "$Q/.installed"
  fi
  PY=$Q/bin/python
fi
exec "${DROP[@]}" "$PY" "${PYTEST[@]}"
