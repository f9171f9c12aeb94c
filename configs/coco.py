"""COCO captions (Karpathy splits): the decoder on a frozen ImageNet ResNet-101.

This project's recipe at its own grid: 224 px images through an
ImageNet-pretrained ResNet-101 that stays frozen, 7x7 regions of 2048
channels, and the attention LSTM trained on top in bfloat16. The references
attend over 14x14 regions (the paper: VGG-19 conv5_4; sgrvinod and
ruotianluo: ResNet-101 pooled to 14x14); `configs/coco_14x14.py` is that
grid. docs/recipes.md sets every field beside the paper's, sgrvinod's and
ruotianluo's value, with the file each comes from. Weights:
docs/cached_features.md ("Pretrained ResNet weights"). COCO is not
downloaded by training: prepare it once (docs/coco.md), then train, e.g. on
8 GPUs:

  tfds build coco_captions/2014 --data_dir=$HOME/tensorflow_datasets
  python -m visionspeak_jax.main --config=configs/coco.py:8 \
      --workdir=$HOME/sat-coco --config.data_dir=$HOME/tensorflow_datasets \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

The number after the colon is the accelerator count (default 8): each
device takes PER_DEVICE_IMAGES images per step with CAPTIONS_PER_IMAGE of
their references each (ruotianluo's seq_per_img: the image is encoded once
for its five captions), the global batch is that times the count, the
learning rate grows with its square root (Adam), and the step counts keep
the number of epochs. An epoch is every training caption once, as the
references count it. On one GPU: `--config=configs/coco.py:1`. The
two-stage variants are `configs/coco_cached.py` (features extracted once,
the fastest on one accelerator) and `configs/coco_finetune.py` (then the
encoder at a low rate).

Scores are the standard protocol (pycocoevalcap's PTB tokenizer and
METEOR, both through Java): a machine without `java` is refused at start.
"""

import math

from configs import default

# Images per device and step; each brings CAPTIONS_PER_IMAGE decoder rows.
PER_DEVICE_IMAGES = 8
# Reference captions per image in a batch (ruotianluo's seq_per_img).
CAPTIONS_PER_IMAGE = 5
# The learning rate at one device's batch (the PyTorch tutorial's 4e-4).
BASE_LEARNING_RATE = 4e-4
# Karpathy train + restval images (82,783 + 30,504).
TRAIN_IMAGES = 113_287
# Captions per training image in an epoch: sgrvinod keeps exactly 5 per
# image (utils.create_input_files, captions_per_image=5) and counts an epoch
# as every one of them (datasets.CaptionDataset.__len__); ruotianluo reads 5
# per image visit (seq_per_img=5).
EPOCH_CAPTIONS_PER_IMAGE = 5
# Epochs over the captions (sgrvinod's README: its COCO model trained 20).
EPOCHS = 20
# The references' vocabulary: words seen more than 5 times.
VOCAB_MIN_COUNT = 6


def steps_per_epoch(config, train_images: int) -> int:
  """Steps that train on every caption once: 5 per image, as the references."""
  captions = train_images * EPOCH_CAPTIONS_PER_IMAGE
  return max(captions // (config.batch_size * config.captions_per_image), 1)


def get_config(devices: str | None = None):
  """This project's COCO recipe for `devices` accelerators ("8" by default)."""
  devices = int(devices or 8)
  config = default.get_config()
  config.dataset = "coco_captions/2014"
  config.train_split = "train+restval"  # Karpathy: 113k training images.
  config.eval_split = "val"  # 5k images.
  config.test_split = "test"  # 5k images.
  config.image_size = 224
  config.vocab_min_count = VOCAB_MIN_COUNT
  config.max_caption_length = 20
  config.captions_per_image = CAPTIONS_PER_IMAGE
  config.model.resnet_size = "101"
  config.model.resnet_width = 64
  config.model.resnet_stem = "imagenet"  # 224 px -> 7x7 regions of 2048.
  config.model.grid = 0  # The ResNet's own 7x7 map.
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
  config.batch_size = PER_DEVICE_IMAGES * devices
  config.eval_batch_size = 64 * devices
  config.learning_rate = BASE_LEARNING_RATE * math.sqrt(devices)
  epoch = steps_per_epoch(config, TRAIN_IMAGES)
  config.num_train_steps = EPOCHS * epoch
  config.warmup_steps = epoch // 4
  config.eval_every_steps = epoch
  config.checkpoint_every_steps = max(epoch // 4, 1)
  config.log_every_steps = 100
  config.num_eval_examples = 5_000
  config.beam_size = 3
  config.metrics_protocol = "coco"
  return config
