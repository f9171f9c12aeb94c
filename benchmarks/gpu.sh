#!/usr/bin/env bash
# benchmarks/benchmark.py at full COCO size on an accelerator machine.
#
# For an image with JAX (CUDA), flax, optax, orbax, numpy and absl but no
# TensorFlow, TFDS or ml_collections: installs the ml_collections wheel
# carried in benchmarks/wheels/ (offline, --no-deps: its absl-py and PyYAML
# come with flax), prints the GPUs, then runs every section but the input
# pipeline (which needs TensorFlow) within BENCHMARK_SECONDS (default 450:
# with the start-up it stays under 8 minutes). The table goes to stdout and,
# when $OUT is set, to $OUT/benchmark.txt. Extra arguments go to
# benchmark.py after the defaults below, so they override them:
#
#   bash benchmarks/gpu.sh
#   JAX_PLATFORMS=cpu bash benchmarks/gpu.sh --coco_resnet=tiny \
#       --coco_image_size=32 --coco_batch=2    # a rehearsal on a CPU
#
# See benchmarks/README.md, "On a GPU".

set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${BENCHMARK_SECONDS:-450}
out=/dev/null
if [[ -n "${OUT:-}" ]]; then
  out=$OUT/benchmark.txt
fi

if ! "$python" -c "import ml_collections" 2>/dev/null; then
  "$python" -c "import absl, yaml" || {
    echo "gpu.sh: ml_collections needs absl-py and PyYAML, missing here" >&2
    exit 1
  }
  wheel=$(ls benchmarks/wheels/ml_collections-*.whl)
  # A read-only or externally managed environment refuses installs: then
  # the wheel goes to a folder of its own on PYTHONPATH.
  if ! "$python" -m pip install --quiet --no-index --no-deps "$wheel"; then
    target=$(mktemp -d)
    "$python" -m pip install --quiet --no-index --no-deps --target "$target" \
      "$wheel"
    export PYTHONPATH=$target${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

{
  nvidia-smi -L || echo "nvidia-smi: no NVIDIA driver here"
  lscpu | grep 'Model name' || true
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  # -u: rows reach the file as they are printed, so a run cut short by the
  # timeout keeps the sections it finished (COCO first).
  status=0
  timeout "$budget" "$python" -u benchmarks/benchmark.py \
    --coco_batch=32 --coco_resnet=101 --coco_image_size=224 \
    --coco_variants=frozen,finetune --coco_dtypes=float32,bfloat16 \
    --coco_steps=10 --coco_repeats=3 \
    --pipeline_dataset= "$@" || status=$?
  if [[ $status == 124 ]]; then
    echo "gpu.sh: benchmark.py stopped after ${budget} s (BENCHMARK_SECONDS)"
  fi
  exit "$status"
} 2>&1 | tee "$out"
