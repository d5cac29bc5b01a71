#!/usr/bin/env bash
# Submit an elborl training run to a Ray cluster as a Ray job.
#   deploy/submit.sh [CONFIG] [extra `elborl train` args...]
# Environment:
#   RAY_ADDRESS          the cluster's dashboard/job address (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE=token  and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH
#                        (Ray 2.60 turns token authentication on by default; keep it on)
#   ELBORL_NO_WAIT=1     submit and return instead of following the logs
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/shapes.yaml}
shift || true
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
wait_flag=()
[ "${ELBORL_NO_WAIT:-0}" = 1 ] && wait_flag=(--no-wait)
RAY=${RAY:-ray}
command -v "$RAY" >/dev/null || RAY=.venv/bin/ray
exec "$RAY" job submit "${wait_flag[@]}" \
  --runtime-env deploy/runtime_env.yaml \
  --entrypoint-num-cpus 0 \
  -- elborl train --config "$config" "$@"
