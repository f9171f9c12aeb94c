"""Process start-up shared by the command-line entry points."""

import logging as pylogging
import sys

from absl import logging
import jax
import ml_collections

from visionspeak_jax import checkpoint
from visionspeak_jax import distributed
from visionspeak_jax import input_pipeline

# What a user can cause (bad config, data, checkpoint or weights file; a
# diverging loss): an entry point prints these as one line and exits.
USER_ERRORS = (input_pipeline.DataError, checkpoint.CheckpointError,
               FloatingPointError, ValueError)

# Libraries whose INFO lines would bury a run's own log.
_QUIET_INFO = ("/orbax/", "/tensorflow_datasets/")


class _QuietLibraries(pylogging.Filter):
  """Drops INFO (and lower) records logged from chatty libraries."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno > pylogging.INFO or
            not any(part in record.pathname for part in _QUIET_INFO))


def start(config: ml_collections.ConfigDict) -> None:
  """Quiets library logs, keeps TensorFlow off accelerators, joins the cluster.

  Exits with one sentence when the config's cluster settings are wrong.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TensorFlow only feeds data; keep it off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], "GPU")
  try:
    distributed.initialize(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
