"""Self-critical training (SCST) on COCO, from a cross-entropy run.

Starts from a finished run of `configs/coco.py` (or `coco_cached.py`) and
optimises CIDEr-D of five sampled captions per image against the others'
mean reward, the decoder at 5e-5 for 20 epochs over the images, as
ruotianluo/self-critical.pytorch's `configs/a2i2_nsc.yml` (epochs 30 to 50
after its cross-entropy run); the number after the colon is the
accelerator count, as in `coco.py`:

  python -m visionspeak_jax.main --config=configs/coco_scst.py:8 \
      --workdir=$HOME/sat-coco-scst --config.init_from=$HOME/sat-coco \
      --config.data_dir=$HOME/tensorflow_datasets \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

For a cached run add `--config.data_source=feature_cache` and its
`--config.feature_cache_dir`.
"""

from configs import coco

# Epochs of self-critical training after cross-entropy, each a pass over
# the training images with num_samples captions sampled per image.
EPOCHS = 20


def get_config(devices: str | None = None):
  """`coco.py`'s model and batch, the SCST objective."""
  config = coco.get_config(devices)
  config.objective = "scst"
  config.captions_per_image = 1  # SCST samples its own captions.
  config.scst.num_samples = 5
  config.scst.baseline = "mean"
  config.learning_rate = 5e-5
  steps_per_epoch = coco.TRAIN_IMAGES // config.batch_size
  config.num_train_steps = EPOCHS * steps_per_epoch
  config.warmup_steps = 0
  config.eval_every_steps = steps_per_epoch
  return config
