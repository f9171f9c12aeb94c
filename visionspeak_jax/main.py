"""Trains and evaluates the captioner.

  python -m visionspeak_jax.main --config=configs/shapes.py --workdir=/tmp/shapes
  python -m visionspeak_jax.main --config=configs/coco.py --workdir=DIR \
      --config.batch_size=64
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
from visionspeak_jax import input_pipeline
from visionspeak_jax import train

FLAGS = flags.FLAGS
# Libraries whose INFO lines would bury the training log.
_QUIET_INFO = ("/orbax/", "/tensorflow_datasets/")
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
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
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (input_pipeline.DataError, checkpoint.CheckpointError,
          FloatingPointError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
