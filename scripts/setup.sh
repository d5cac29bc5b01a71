#!/usr/bin/env bash
# One command to set elborl up: a virtualenv at .venv with the CPU build of torch (or the
# CUDA build where ELBORL_TORCH_INDEX says so), every dependency pinned by constraints.txt,
# the project installed editable, and DeepSpeed's CPU comm op pre-built.
#   bash scripts/setup.sh            # create/update .venv
#   bash scripts/setup.sh --freeze   # also rewrite constraints.txt from what got installed
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's Chromium (and its driver) for the dashboard's browser test; Playwright drives this
# binary, it never downloads a browser. Skipped when present, or when not root on Debian.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: no chromium and cannot apt-get it; the dashboard browser test will be skipped" >&2
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first: anything that depends on torch would otherwise pull a multi-GB CUDA build.
"${PIP[@]}" install "torch==2.13.0"
# DeepSpeed built against the installed torch, with the CPU shared-memory comm op compiled
# now rather than JIT-compiled (30-45 s) on the first engine start.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${PIP[@]}" install --no-build-isolation -c constraints.txt deepspeed
fi
"${PIP[@]}" install -c constraints.txt -e ".[dev,ocr]"
.venv/bin/python -m pip check
if [ "${1:-}" = "--freeze" ]; then
  { echo "# Versions known to install and work together; regenerate with scripts/setup.sh --freeze."
    .venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' ; } > constraints.txt
fi
echo "elborl is set up: source .venv/bin/activate && elborl --help"
