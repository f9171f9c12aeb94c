"""COCO, fine-tuning: images through the ResNet, the encoder at a low rate.

Starts from a decoder trained on cached features (`configs/coco_cached.py`)
or on the frozen encoder (`configs/coco.py`) and the pretrained encoder
under it, and trains both end to end, the encoder at 1/40 of the decoder's
learning rate:

  python -m visionspeak_jax.main --config=configs/coco_finetune.py:8 \
      --workdir=$HOME/sat-coco-ft \
      --config.data_dir=$HOME/tensorflow_datasets \
      --config.init_from=$HOME/sat-coco-cached \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

The number after the colon is the accelerator count, as in `coco.py`.
Without `model.pretrained_path` the encoder comes from the `init_from` run:
its own encoder, or the one recorded for its cached features.
`--config.lr_mults.encoder=0` keeps the encoder frozen, which gives a
captioner of image files with the cached run's decoder unchanged in quality.
"""

from configs import coco

# Epochs of fine-tuning over the captions after the decoder's own training.
EPOCHS = 5


def get_config(devices: str | None = None):
  """`coco.py`, started from a run, with a slow encoder."""
  config = coco.get_config(devices)
  # 1e-5 at one device's 4e-4 (sgrvinod's train.py fine-tunes at 1e-4, a
  # quarter of the decoder's rate: docs/recipes.md).
  config.lr_mults.encoder = 0.025
  epoch = coco.steps_per_epoch(config, coco.TRAIN_IMAGES)
  config.num_train_steps = EPOCHS * epoch
  config.eval_every_steps = epoch
  return config
