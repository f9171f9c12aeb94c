"""COCO captions (Karpathy splits): the decoder on a frozen ImageNet ResNet-101.

The paper's recipe: 224 px images through an ImageNet-pretrained ResNet-101
(7x7 regions of 2048 channels) that stays frozen, and the attention LSTM
trained on top in bfloat16 mixed precision. Weights: docs/cached_features.md
("Pretrained ResNet weights"). COCO is not downloaded by training: prepare
it once with TFDS (about 20 GB), then train, e.g. on 8 GPUs:

  tfds build coco_captions/2014 --data_dir=$HOME/tensorflow_datasets
  python -m visionspeak_jax.main --config=configs/coco.py:8 \
      --workdir=$HOME/sat-coco --config.data_dir=$HOME/tensorflow_datasets \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

The number after the colon is the accelerator count (default 8): each
device takes PER_DEVICE_BATCH images per step, the global batch is that
times the count, the learning rate grows with its square root (Adam), and
the step counts keep the number of epochs. On one GPU:
`--config=configs/coco.py:1`. The two-stage variants are
`configs/coco_cached.py` (features extracted once, the fastest on one
accelerator) and `configs/coco_finetune.py` (then the encoder at a low rate).
"""

import math

from configs import default

# Images per device and step (ResNet-101 at 224 px in bfloat16, frozen).
PER_DEVICE_BATCH = 32
# The learning rate at one device's batch (the PyTorch tutorial's 4e-4).
BASE_LEARNING_RATE = 4e-4
# Karpathy train + restval images, and the epochs over them.
TRAIN_IMAGES = 113_287
EPOCHS = 20


def get_config(devices: str | None = None):
  """The paper's setting for `devices` accelerators ("8" by default)."""
  devices = int(devices or 8)
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
  config.model.require_pretrained = True
  config.model.embed_dim = 512
  config.model.attention_dim = 512
  config.model.hidden_dim = 512
  config.model.dropout_rate = 0.5
  # As the paper's code, not its eq. 14 (lambda on a caption's penalty
  # against its summed log-likelihood): the code's COCO script
  # (evaluate_coco.py: alpha_c = 1 at batch B = 64) adds
  # alpha_c mean_r sum_b (1 - sum_t alpha_tbr)^2 to the cross-entropy
  # (1 / B) sum_b sum_t xent_tb, so a caption's sum_r (...)^2 weighs
  # alpha_c B / R against its summed cross-entropy. Here the penalty is a
  # mean over captions against the cross-entropy's mean per word: with L
  # words per caption the same weight is alpha_c B / (R L), for R = 49
  # regions and L about 11 (COCO words with EOS) 64 / 539.
  config.alpha_c = 0.12
  config.lr_mults.encoder = 0.0  # Frozen: ImageNet features, as the paper.
  config.dtype = "bfloat16"
  config.decode_dtype = "bfloat16"
  config.batch_size = PER_DEVICE_BATCH * devices
  config.eval_batch_size = 2 * PER_DEVICE_BATCH * devices
  config.learning_rate = BASE_LEARNING_RATE * math.sqrt(devices)
  steps_per_epoch = TRAIN_IMAGES // config.batch_size
  config.num_train_steps = EPOCHS * steps_per_epoch
  config.warmup_steps = steps_per_epoch // 4
  config.eval_every_steps = 2 * steps_per_epoch
  config.checkpoint_every_steps = max(steps_per_epoch // 4, 1)
  config.log_every_steps = 100
  config.num_eval_examples = 5_000
  config.beam_size = 3
  return config
