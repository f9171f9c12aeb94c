"""Runs a frozen ResNet once over the config's splits and caches the features.

  python -m visionspeak_jax.extract_features --config=configs/coco.py \
      --workdir=$HOME/sat-coco \
      --config.model.pretrained_path=$HOME/resnet101.safetensors
  python -m visionspeak_jax.main --config=configs/coco.py \
      --workdir=$HOME/sat-coco-cached --config.encoder_mode=cached \
      --config.feature_cache_dir=$HOME/sat-coco/features

The encoder comes from --config.model.pretrained_path, else from the latest
checkpoint in --workdir, else (only with --config.extract_random_encoder) a
random init. The cache goes to --config.feature_cache_dir or WORKDIR/features.
"""

import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from visionspeak_jax import checkpoint
from visionspeak_jax import distributed
from visionspeak_jax import features
from visionspeak_jax import input_pipeline
from visionspeak_jax import pretrained

FLAGS = flags.FLAGS
# Libraries whose INFO lines would bury the extraction log.
_QUIET_INFO = ("/orbax/", "/tensorflow_datasets/")
flags.DEFINE_string("workdir", None,
                    "Run whose encoder is used; default home of the cache.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops INFO (and lower) records logged from chatty libraries."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno > pylogging.INFO or
            not any(part in record.pathname for part in _QUIET_INFO))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TensorFlow only feeds data; keep it off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], "GPU")
  try:
    distributed.initialize(FLAGS.config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    directory = features.extract(FLAGS.config, FLAGS.workdir)
  except (input_pipeline.DataError, checkpoint.CheckpointError,
          features.FeatureCacheError, pretrained.PretrainedError,
          ValueError) as e:
    sys.exit(f"error: {e}")
  logging.info("Features written to %s.", directory)


if __name__ == "__main__":
  app.run(main)
