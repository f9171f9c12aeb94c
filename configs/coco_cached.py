"""COCO, two stages: features extracted once, then the decoder on the cache.

The paper's way and the fastest on one accelerator: a frozen ImageNet
ResNet-101 runs once over the Karpathy splits, and the decoder then trains on
its 7x7x2048 features without touching an image:

  python -m visionspeak_jax.tools.extract_features \
      --config=configs/coco_cached.py:1 \
      --workdir=$HOME/sat-coco-features \
      --config.data_dir=$HOME/tensorflow_datasets \
      --config.model.pretrained_path=$HOME/resnet101.safetensors
  python -m visionspeak_jax.main --config=configs/coco_cached.py:1 \
      --workdir=$HOME/sat-coco-cached \
      --config.feature_cache_dir=$HOME/sat-coco-features/features

The number after the colon is the accelerator count, as in `coco.py`. The
cached run's checkpoint holds the decoder only; `configs/coco_finetune.py`
turns it into a captioner of image files.
"""

from configs import coco


def get_config(devices: str | None = None):
  """`coco.py` on a feature cache: the decoder alone."""
  config = coco.get_config(devices)
  config.data_source = "feature_cache"
  return config
