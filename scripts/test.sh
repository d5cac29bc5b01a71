#!/usr/bin/env bash
# Run the test suite (all markers, slow ones included) with the project's virtualenv,
# creating it first (scripts/setup.sh) when it is missing.
# Ray advertises the machine's primary address, so when we can (root + unshare), the tests run
# inside a private network namespace that has only loopback: no test traffic leaves 127.0.0.1.
# The suite runs on two pytest-xdist workers (ELBORL_TEST_WORKERS, default 2), a test file per
# worker at a time (--dist loadfile: a file's module-scoped runs are made once); most of an
# end-to-end test's time is actors starting and waiting on each other, so two at once take
# ~20 min here instead of ~34 one after another.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m unit         # extra arguments go to pytest
#   bash scripts/test.sh -n 0            # one process, no workers
set -euo pipefail
cd "$(dirname "$0")/.."
# First use on a fresh machine: set the environment up (scripts/setup.sh; a few minutes).
[ -x .venv/bin/elborl ] || { echo "no .venv yet: running scripts/setup.sh first" >&2; bash scripts/setup.sh; }
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
cmd=(.venv/bin/python -m pytest -n "${ELBORL_TEST_WORKERS:-2}" --dist loadfile "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' bash "${cmd[@]}"
fi
echo "note: not root or no unshare; running without a loopback-only namespace" >&2
exec "${cmd[@]}"
