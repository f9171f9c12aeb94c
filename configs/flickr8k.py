"""Flickr8k (Karpathy splits): the decoder on a frozen ImageNet ResNet-101.

sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning trains Flickr8k this way:
the encoder an ImageNet ResNet-101, frozen; batch 32; the decoder at a
learning rate of 4e-4 (gradients clipped at 5); alpha_c 1; dropout 0.5;
embedding, attention and LSTM sizes 512; at most 120 epochs, stopped early
on the validation BLEU-4; beam search on the test split. Here the images are
`coco.py`'s (224 px, 7x7 regions of 2048 channels, bfloat16) and:

- alpha_c: the tutorial's 1 weighs the penalty's mean over regions, this
  project's `alpha_c` its sum over regions (per caption, both against the
  cross-entropy per word), so the same weight is 1 / 49 for 49 regions;
- no early stop: the run takes all 120 epochs and WORKDIR/best keeps the
  checkpoint of the best validation BLEU-4 (the tutorial's criterion); the
  learning rate warms up and decays on a cosine (the tutorial's: x0.8 after
  8 epochs without a better BLEU-4).

The data is Karpathy's dataset_flickr8k.json and the Flicker8k_Dataset
folder in one directory (docs/your_own_data.md); the first run builds the
TFDS set from them. Weights: docs/cached_features.md ("Pretrained ResNet
weights"). On one GPU:

  python -m visionspeak_jax.main --config=configs/flickr8k.py \
      --workdir=$HOME/sat-flickr8k --config.manual_dir=$HOME/flickr8k \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

A number after a colon is the accelerator count (default 1), as in
`coco.py`: `--config=configs/flickr8k.py:4` keeps 32 images per device and
the epochs.
"""

from configs import coco

# Karpathy's Flickr8k training images, and the tutorial's epochs over them.
TRAIN_IMAGES = 6_000
EPOCHS = 120
# Regions of a 224 px image after ResNet-101 (7x7).
NUM_REGIONS = 49
# The tutorial's alpha_c, on the penalty's mean over regions.
TUTORIAL_ALPHA_C = 1.0


def set_schedule(config, train_images: int, epochs: int = EPOCHS) -> None:
  """Step counts from epochs x images / batch; evaluation every epoch."""
  steps_per_epoch = max(train_images // config.batch_size, 1)
  config.num_train_steps = epochs * steps_per_epoch
  config.warmup_steps = max(steps_per_epoch // 4, 1)
  config.eval_every_steps = steps_per_epoch  # The tutorial validates each.
  config.checkpoint_every_steps = max(steps_per_epoch // 4, 1)


def get_config(devices: str | None = None):
  """The tutorial's Flickr8k recipe for `devices` accelerators ("1")."""
  config = coco.get_config(devices or "1")  # Batch 32, 4e-4 per device.
  config.dataset = "karpathy_captions/flickr8k"
  config.train_split = "train"  # Karpathy: 6000 images.
  config.eval_split = "val"  # 1000 images.
  config.test_split = "test"  # 1000 images.
  config.num_eval_examples = -1  # The whole split.
  config.vocab_min_count = 5
  config.model.dropout_rate = 0.5
  config.model.embed_dim = 512
  config.model.attention_dim = 512
  config.model.hidden_dim = 512
  config.alpha_c = TUTORIAL_ALPHA_C / NUM_REGIONS
  config.lr_mults.encoder = 0.0  # Frozen.
  config.grad_clip_norm = 5.0
  config.best_metric = "bleu4"  # The tutorial stops on it.
  config.beam_size = 3
  set_schedule(config, TRAIN_IMAGES)
  return config
