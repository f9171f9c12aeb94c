#!/usr/bin/env bash
# Runs on one machine.
#
#   bash launch/local.sh [WORKDIR]            # the default shapes run
#   NPROC=2 bash launch/local.sh [WORKDIR]    # 2 local processes on loopback
#
# One process uses every local device (each GPU, or the CPU split into one device per core).
# NPROC>1 starts that many processes, each with 2 fake CPU devices, talking
# over 127.0.0.1: a rehearsal of a multi-host run on one machine.
set -euo pipefail
WORKDIR=${1:-/tmp/visionspeak-shapes}
CONFIG=${CONFIG:-configs/shapes.py}
NPROC=${NPROC:-1}
PORT=${PORT:-12355}

if [[ "$NPROC" -eq 1 ]]; then
  exec python -m visionspeak_jax.main --config="$CONFIG" --workdir="$WORKDIR"
fi

pids=()
for ((i = 0; i < NPROC; i++)); do
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
  python -m visionspeak_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
      --config.coordinator_address="127.0.0.1:$PORT" \
      --config.num_processes="$NPROC" --config.process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
