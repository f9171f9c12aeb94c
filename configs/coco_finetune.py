"""COCO, fine-tuning: images through the ResNet, the encoder at a low rate.

Starts from a decoder trained on cached features (`configs/coco_cached.py`)
and the pretrained encoder that extracted them, and trains both end to end,
the encoder at 1/40 of the decoder's learning rate:

  python -m visionspeak_jax.main --config=configs/coco_finetune.py \
      --workdir=$HOME/sat-coco-ft \
      --config.data_dir=$HOME/tensorflow_datasets \
      --config.init_from=$HOME/sat-coco-cached \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

Without `model.pretrained_path` the encoder is rebuilt from what the cached
run recorded about its features. `--config.lr_mults.encoder=0` keeps the
encoder frozen, which gives a captioner of image files with the cached run's
decoder unchanged in quality.
"""

from configs import coco


def get_config():
  """`coco.py`, started from a run, with a slow encoder."""
  config = coco.get_config()
  config.lr_mults.encoder = 0.025  # 1e-5 on the decoder's 4e-4 schedule.
  config.learning_rate = 4e-4
  config.num_train_steps = 20_000
  config.warmup_steps = 500
  return config
