#!/usr/bin/env bash
# COCO training on a Cloud TPU VM pod slice: the same command runs on every
# host; JAX finds the other hosts itself (config.distributed="auto").
#
#   bash launch/tpu_vm_pod.sh TPU_NAME ZONE gs://BUCKET/tensorflow_datasets gs://BUCKET/sat-coco
#
# The repository must already be installed on every host
# (pip install -e . from a checkout at ~/visionspeak-jax).
set -euo pipefail
TPU_NAME=${1:?usage: tpu_vm_pod.sh TPU_NAME ZONE DATA_DIR WORKDIR}
ZONE=${2:?usage: tpu_vm_pod.sh TPU_NAME ZONE DATA_DIR WORKDIR}
DATA_DIR=${3:?usage: tpu_vm_pod.sh TPU_NAME ZONE DATA_DIR WORKDIR}
WORKDIR=${4:?usage: tpu_vm_pod.sh TPU_NAME ZONE DATA_DIR WORKDIR}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/visionspeak-jax && python -m visionspeak_jax.main \
    --config=configs/coco.py --workdir=$WORKDIR \
    --config.data_dir=$DATA_DIR \
    --config.batch_size=1024 --config.eval_batch_size=1024 \
    --config.learning_rate=2e-3"
