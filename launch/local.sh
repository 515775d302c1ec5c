#!/bin/bash
# launch/local.sh N [--config.KEY=VALUE ...]: train the quickstart with N JAX processes on this machine (CPU, gloo
# collectives, coordinator on localhost) -- the multi-host code path without a cluster.
#
#   launch/local.sh 2                                   # 2 processes, 1 CPU device each: a 2-device mesh
#   DEVICES_PER_PROCESS=2 launch/local.sh 2 --config.train.steps=20
#
# Environment: CONFIG (default experiments/quickstart.py), WORKDIR (runs/quickstart_local<N>), DATA (data/demo, built
# if missing), PORT (coordinator port, random), DEVICES_PER_PROCESS (1). Process 0's output is shown; every process
# logs to WORKDIR/process_<i>.log. If one process fails the others are stopped.
set -euo pipefail
N=${1:?usage: launch/local.sh N [--config.KEY=VALUE ...]}
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=$(realpath -m "${CONFIG:-$ROOT/experiments/quickstart.py}")
WORKDIR=$(realpath -m "${WORKDIR:-$ROOT/runs/quickstart_local$N}")
DATA=$(realpath -m "${DATA:-$ROOT/data/demo}")
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
cd "$ROOT"
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
if [ ! -f "$DATA/manifest.json" ]; then
  "$PYTHON" -m granite_jax.cli prepare --demo --out "$DATA"
fi
mkdir -p "$WORKDIR"
for ((i = 0; i < N; i++)); do : > "$WORKDIR/process_$i.log"; done  # exist before `tail` opens process 0's
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
for ((i = 0; i < N; i++)); do
  "$PYTHON" -m granite_jax.cli train --config "$CONFIG" --workdir "$WORKDIR" --no_progress \
    --coordinator_address "localhost:$PORT" --num_processes "$N" --process_id "$i" \
    "--config.data.sources=[{'name': 'demo', 'path': '$DATA', 'weight': 1.0}]" "$@" \
    > "$WORKDIR/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$WORKDIR/process_0.log" --pid="${pids[0]}" &
status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=1
    stop_all
  fi
done
wait
[ "$status" -eq 0 ] || echo "launch/local.sh: a process failed; see $WORKDIR/process_*.log" >&2
exit "$status"
