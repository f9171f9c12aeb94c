"""Flickr8k (Karpathy splits): sgrvinod's tutorial recipe.

sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning trains this way
(`train.py`, `utils.py`, `models.py`, `create_input_files.py`): 256 px
images through an ImageNet ResNet-101, frozen, its 8x8 map spread over
14x14 regions by `AdaptiveAvgPool2d((14, 14))` (cells repeat:
`model.grid_upsample`); batch 32 captions, one image each; the decoder at
4e-4 (Adam); every gradient element clamped to +-5 (`utils.clip_gradient`);
alpha_c 1; dropout 0.5; embedding, attention and LSTM sizes 512; words seen
more than 5 times; at most 120 epochs over the captions, stopped early on
the validation BLEU-4; beam search on the test split. Here:

- alpha_c: the tutorial's 1 weighs the penalty's mean over regions, this
  project's `alpha_c` its sum over regions (per caption, both against the
  cross-entropy per word), so the same weight is 1 / 196;
- no early stop: the run takes all 120 epochs and WORKDIR/best keeps the
  checkpoint of the best validation BLEU-4 (the tutorial's criterion) of
  beam search (the tutorial's is teacher-forced); the learning rate warms
  up and decays on a cosine (the tutorial's: x0.8 after 8 epochs without a
  better BLEU-4);
- an epoch is five captions per image, one drawn at random per visit (the
  tutorial: each of the image's five once); captions are cut at 20 words
  (the tutorial drops those over 50) and the vocabulary counts training
  captions only (the tutorial counts every split's);
- bfloat16, as `coco.py`; scores with the standard protocol (PTB tokenizer
  and METEOR through Java; the tutorial reports nltk's BLEU-4).

docs/recipes.md has every field beside its source. The data is Karpathy's
dataset_flickr8k.json and the Flicker8k_Dataset folder in one directory
(docs/your_own_data.md); the first run builds the TFDS set from them.
Weights: docs/cached_features.md ("Pretrained ResNet weights"). On one GPU:

  python -m visionspeak_jax.main --config=configs/flickr8k.py \
      --workdir=$HOME/sat-flickr8k --config.manual_dir=$HOME/flickr8k \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

A number after a colon is the accelerator count (default 1), as in
`coco.py`: `--config=configs/flickr8k.py:4` keeps 32 captions per device
and the epochs.
"""

from configs import coco

# Karpathy's Flickr8k training images, and the tutorial's epochs over their
# captions.
TRAIN_IMAGES = 6_000
EPOCHS = 120
# The tutorial's images (utils.create_input_files resizes to 256x256) and
# its encoder's grid (models.Encoder, encoded_image_size=14).
IMAGE_SIZE = 256
GRID = 14
# Captions per device and step (train.py: batch_size = 32).
PER_DEVICE_CAPTIONS = 32
# The tutorial's alpha_c, on the penalty's mean over regions.
TUTORIAL_ALPHA_C = 1.0
# The tutorial's clamp on each gradient element (train.py: grad_clip = 5.).
GRAD_CLIP_VALUE = 5.0


def set_schedule(config, train_images: int, epochs: int = EPOCHS) -> None:
  """Step counts from epochs over the captions; evaluation every epoch."""
  epoch = coco.steps_per_epoch(config, train_images)
  config.num_train_steps = epochs * epoch
  config.warmup_steps = max(epoch // 4, 1)
  config.eval_every_steps = epoch  # The tutorial validates each.
  config.checkpoint_every_steps = max(epoch // 4, 1)


def get_config(devices: str | None = None):
  """The tutorial's Flickr8k recipe for `devices` accelerators ("1")."""
  devices = int(devices or 1)
  config = coco.get_config(str(devices))  # 4e-4 per device, frozen.
  config.dataset = "karpathy_captions/flickr8k"
  config.train_split = "train"  # Karpathy: 6000 images.
  config.eval_split = "val"  # 1000 images.
  config.test_split = "test"  # 1000 images.
  config.num_eval_examples = -1  # The whole split.
  config.image_size = IMAGE_SIZE
  config.model.grid = GRID
  config.model.grid_upsample = True  # 8x8 -> 14x14, as the tutorial.
  config.captions_per_image = 1  # One image per caption, as the tutorial.
  config.batch_size = PER_DEVICE_CAPTIONS * devices
  config.vocab_min_count = coco.VOCAB_MIN_COUNT
  config.model.dropout_rate = 0.5
  config.model.embed_dim = 512
  config.model.attention_dim = 512
  config.model.hidden_dim = 512
  config.alpha_c = TUTORIAL_ALPHA_C / (GRID * GRID)
  config.lr_mults.encoder = 0.0  # Frozen.
  config.grad_clip_value = GRAD_CLIP_VALUE
  config.grad_clip_norm = 0.0
  config.best_metric = "bleu4"  # The tutorial stops on it.
  config.beam_size = 3
  set_schedule(config, TRAIN_IMAGES)
  return config
