#!/usr/bin/env bash
# Single-machine runs. Usage: bash launch/local.sh [WORKDIR]
# All local devices (CPU cores show as one device; GPUs each as one) are used
# by the pmapped step; the global batch must divide by the device count.
set -euo pipefail
WORKDIR=${1:-/tmp/visionspeak-shapes}
python -m visionspeak_jax.main --config=configs/shapes.py --workdir="$WORKDIR"
