#!/usr/bin/env bash
# Submit an elborl training run to a Ray cluster as a Ray job.
#   deploy/submit.sh [CONFIG] [extra `elborl train` args...]
# Environment:
#   RAY_ADDRESS          the cluster's dashboard/job address (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE=token  and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH
#                        (Ray 2.60 turns token authentication on by default; keep it on)
#   ELBORL_NO_WAIT=1     submit and return instead of following the logs
#   ELBORL_RUNS_DIR      where run directories go unless the config's runs_dir is absolute
#                        (default: this checkout's runs/, as an absolute path). The job's own
#                        working directory is temporary (Ray deletes it), so the driver gets an
#                        absolute root; on a multi-node cluster point it at storage every node
#                        sees. `elborl serve --runs-dir` and `--resume` find runs there.
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
runs_root=${ELBORL_RUNS_DIR:-$PWD/runs}
case "$runs_root" in /*) ;; *) runs_root="$PWD/$runs_root" ;; esac
# A head that has just started may not have its job agent yet: Ray then refuses the submission
# ("No available agent to submit job, please try again later") before any job exists, so that
# one error is retried (5 times, 5 s apart); any other outcome is the job's.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for attempt in 1 2 3 4 5 6; do
  set +e
  "$RAY" job submit "${wait_flag[@]}" \
    --runtime-env deploy/runtime_env.yaml \
    --entrypoint-num-cpus 0 \
    -- env ELBORL_RUNS_DIR="$runs_root" elborl train --config "$config" "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 0 ] || [ "$attempt" = 6 ] || ! grep -q "No available agent" "$out"; then
    exit "$rc"
  fi
  echo "submit.sh: the cluster's job agent is not up yet; retrying in 5 s ($attempt/5)" >&2
  sleep 5
done
