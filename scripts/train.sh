#!/usr/bin/env bash
# The main job: RL fine-tuning of the shipped base model on the built-in `shapes` benchmark,
# with real Ray actors and a real DeepSpeed learner (README "Quick start"). Creates .venv
# first (scripts/setup.sh) when it is missing; extra arguments go to `elborl train`.
#   bash scripts/train.sh                               # configs/shapes.yaml -> runs/shapes/
#   bash scripts/train.sh --set name=again              # any `elborl train` option
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/elborl ] || { echo "no .venv yet: running scripts/setup.sh first" >&2; bash scripts/setup.sh; }
exec .venv/bin/elborl train --config configs/shapes.yaml "$@"
