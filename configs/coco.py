"""COCO captions (Karpathy splits) with ResNet-101 and 7x7 regions at 224 px.

COCO is not downloaded by training: prepare it once with TFDS (about 20 GB),
then train, e.g. on 8 GPUs:

  tfds build coco_captions/2014 --data_dir=$HOME/tensorflow_datasets
  python -m visionspeak_jax.main --config=configs/coco.py --workdir=$HOME/sat \
      --config.data_dir=$HOME/tensorflow_datasets
"""

from configs import default


def get_config():
  """The paper's setting: 224 px, ResNet-101 (2048 x 7x7), 512-d decoder."""
  config = default.get_config()
  config.dataset = "coco_captions/2014"
  config.train_split = "train+restval"  # Karpathy: 113k training images.
  config.eval_split = "val"  # 5k images.
  config.test_split = "test"  # 5k images.
  config.image_size = 224
  config.vocab_min_count = 5
  config.max_caption_length = 20
  config.model.resnet_size = "101"
  config.model.resnet_width = 64
  config.model.resnet_stem = "imagenet"  # 224 px -> 7x7 regions of 2048.
  config.model.embed_dim = 512
  config.model.attention_dim = 512
  config.model.hidden_dim = 512
  config.model.dropout_rate = 0.5
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_train_steps = 100_000
  config.learning_rate = 4e-4
  config.warmup_steps = 1_000
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.num_eval_examples = 5_000
  return config
