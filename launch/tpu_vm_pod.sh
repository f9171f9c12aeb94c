#!/usr/bin/env bash
# COCO training on a Cloud TPU VM pod slice: the same command runs on every
# host; JAX finds the other hosts itself (config.distributed="auto").
#
#   bash launch/tpu_vm_pod.sh TPU_NAME ZONE gs://BUCKET/tensorflow_datasets \
#       gs://BUCKET/sat-coco CHIPS ~/resnet101.safetensors
#
# CHIPS is the slice's accelerator count (configs/coco.py:CHIPS sets the
# global batch, 32 per chip, the learning rate and the schedule); the
# weights file must be on every host.
#
# The repository must already be installed on every host
# (pip install -e . from a checkout at ~/visionspeak-jax).
set -euo pipefail
USAGE="usage: tpu_vm_pod.sh TPU_NAME ZONE DATA_DIR WORKDIR CHIPS WEIGHTS"
TPU_NAME=${1:?$USAGE}
ZONE=${2:?$USAGE}
DATA_DIR=${3:?$USAGE}
WORKDIR=${4:?$USAGE}
CHIPS=${5:?$USAGE}
WEIGHTS=${6:?$USAGE}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/visionspeak-jax && python -m visionspeak_jax.main \
    --config=configs/coco.py:$CHIPS --workdir=$WORKDIR \
    --config.data_dir=$DATA_DIR \
    --config.model.pretrained_path=$WEIGHTS"
