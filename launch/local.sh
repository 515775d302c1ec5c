#!/bin/bash
# launch/local.sh N [--config.KEY=VALUE ...]: train the quickstart with N JAX processes on this machine (CPU, gloo
# collectives, coordinator on localhost) -- the multi-host code path without a cluster.
#
#   launch/local.sh 2                                   # 2 processes, 1 CPU device each: a 2-device mesh
#   DEVICES_PER_PROCESS=2 launch/local.sh 2 --config.train.steps=20
#
# Environment: CONFIG (default experiments/quickstart.py), WORKDIR (runs/quickstart_local<N>), DATA (data/demo, built
# if missing), PORT (coordinator port, random), DEVICES_PER_PROCESS (1), RESTARTS (0), HEARTBEAT_TIMEOUT_S (the
# trainer's default). Process 0's output is shown; every process logs to WORKDIR/process_<i>.log (appended across
# attempts; its pid in process_<i>.pid). If one process fails the others are stopped, and with RESTARTS=k all N
# start again, up to k times, each resuming from the last checkpoint (exit code 2, a config or checkpoint the run
# refuses, is not retried).
set -euo pipefail
N=${1:?usage: launch/local.sh N [--config.KEY=VALUE ...]}
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=$(realpath -m "${CONFIG:-$ROOT/experiments/quickstart.py}")
WORKDIR=$(realpath -m "${WORKDIR:-$ROOT/runs/quickstart_local$N}")
DATA=$(realpath -m "${DATA:-$ROOT/data/demo}")
PYTHON=${PYTHON:-python}
RESTARTS=${RESTARTS:-0}
TIMEOUT_FLAG=()
[ -z "${HEARTBEAT_TIMEOUT_S:-}" ] || TIMEOUT_FLAG=("--heartbeat_timeout_s=$HEARTBEAT_TIMEOUT_S")
cd "$ROOT"
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
if [ ! -f "$DATA/manifest.json" ]; then
  "$PYTHON" -m granite_jax.cli prepare --demo --out "$DATA"
fi
mkdir -p "$WORKDIR"
for ((i = 0; i < N; i++)); do : > "$WORKDIR/process_$i.log"; done
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
run_once() {  # one attempt: N processes; returns 0, 2 (refused: do not retry) or 1
  local port=${PORT:-$((20000 + RANDOM % 20000))} status=0 code
  pids=()
  for ((i = 0; i < N; i++)); do
    "$PYTHON" -m granite_jax.cli train --config "$CONFIG" --workdir "$WORKDIR" --no_progress "${TIMEOUT_FLAG[@]}" \
      --coordinator_address "localhost:$port" --num_processes "$N" --process_id "$i" \
      "--config.data.sources=[{'name': 'demo', 'path': '$DATA', 'weight': 1.0}]" "$@" \
      >> "$WORKDIR/process_$i.log" 2>&1 &
    pids+=($!)
    echo $! > "$WORKDIR/process_$i.pid"
  done
  tail -n 0 -f "$WORKDIR/process_0.log" --pid="${pids[0]}" &
  for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    if [ "$code" -ne 0 ] && [ "$status" -ne 2 ]; then
      status=$([ "$code" -eq 2 ] && echo 2 || echo 1)
      stop_all
    fi
  done
  wait
  return "$status"
}
status=0
for ((attempt = 0; attempt <= RESTARTS; attempt++)); do
  status=0
  run_once "$@" || status=$?
  [ "$status" -eq 1 ] && [ "$attempt" -lt "$RESTARTS" ] || break
  echo "launch/local.sh: a process failed; restarting all $N from the last checkpoint ($((attempt + 1))/$RESTARTS)" >&2
done
[ "$status" -eq 0 ] || echo "launch/local.sh: a process failed; see $WORKDIR/process_*.log" >&2
exit "$status"
