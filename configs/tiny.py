"""A very small config for tests: the `tiny` shapes set, a tiny ResNet.

  python -m visionspeak_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import default


def get_config():
  """Tiny everything, a handful of steps."""
  config = default.get_config()
  config.dataset = "shapes_captions/tiny"
  config.image_size = 32
  config.vocab_min_count = 1
  config.model.resnet_size = "tiny"
  config.model.resnet_width = 8
  config.model.resnet_stem = "small"
  config.model.embed_dim = 16
  config.model.attention_dim = 16
  config.model.hidden_dim = 32
  config.model.dropout_rate = 0.0
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.learning_rate = 1e-3
  config.warmup_steps = 2
  config.log_every_steps = 2
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 3
  config.shuffle_buffer_size = 64
  config.num_eval_examples = 16
  config.max_decode_length = 12
  config.metrics_protocol = "regex-tokens"  # Keeps tests fast; no JVM.
  return config
