#!/usr/bin/env bash
# Run the test suite (all markers, slow ones included) with the project's virtualenv.
# Ray advertises the machine's primary address, so when we can (root + unshare), the tests run
# inside a private network namespace that has only loopback: no test traffic leaves 127.0.0.1.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run 'bash scripts/setup.sh' first" >&2; exit 2; }
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
cmd=(.venv/bin/python -m pytest "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' bash "${cmd[@]}"
fi
echo "note: not root or no unshare; running without a loopback-only namespace" >&2
exec "${cmd[@]}"
