"""The built-in default run: train from scratch on the generated shapes set.

Nothing is downloaded; the shapes data is drawn on this machine the first
time. Runs on two CPU cores (times in README.md's results table):

  python -m visionspeak_jax.main --config=configs/shapes.py \
      --workdir=/tmp/shapes
"""

from configs import default


def get_config():
  """Small images, a tiny ResNet from scratch and a small decoder."""
  config = default.get_config()
  config.dataset = "shapes_captions/default"
  config.image_size = 64
  config.vocab_min_count = 1
  config.model.resnet_size = "tiny"
  # The encoder's backward pass is most of a step on a CPU: 16 channels
  # (64-channel region features) train faster per step than 32, to a
  # better F1 in the same time.
  config.model.resnet_width = 16
  config.model.resnet_stem = "small"  # 64 px -> an 8x8 grid of regions.
  config.model.embed_dim = 128
  config.model.attention_dim = 128
  config.model.hidden_dim = 256
  config.model.dropout_rate = 0.1
  # Captions list objects left to right / top to bottom: the decoder must
  # know where each region is, which a 3-stage CNN barely encodes.
  config.model.position_embedding = True
  # sum_t alpha = 1 per region cannot hold with 64 regions and ~10 words;
  # at weight 1 the penalty flattens attention and blurs which colour goes
  # with which shape.
  config.alpha_c = 0.01
  config.batch_size = 32
  # The fewest steps that meet the quality line (README.md's results table)
  # with some margin, so the run fits in about 5 minutes on 2 cores.
  config.num_train_steps = 3_600
  config.learning_rate = 2e-3
  config.warmup_steps = 200
  config.log_every_steps = 100
  # Evaluate once, at the end (the validation and test splits): the
  # training log every 100 steps shows the progress.
  config.eval_every_steps = 3_600
  config.checkpoint_every_steps = 1_000  # About once a minute.
  config.shuffle_buffer_size = 10_000  # The whole split: a full shuffle.
  config.cache_train_images = True  # 10k x 64x64x3 = 123 MB.
  return config
