"""Process start-up shared by the command-line entry points."""

import logging as pylogging
import sys
from typing import Any, Callable

from absl import app
from absl import logging
import jax
import ml_collections

from visionspeak_jax import errors
from visionspeak_jax.platform import cpu_tuning
from visionspeak_jax.platform import distributed
from visionspeak_jax.platform import dtypes

# Libraries whose INFO lines would bury a run's own log.
_QUIET_INFO = ("/orbax/", "/tensorflow_datasets/")


class _QuietLibraries(pylogging.Filter):
  """Drops INFO (and lower) records logged from chatty libraries."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno > pylogging.INFO or
            not any(part in record.pathname for part in _QUIET_INFO))


def start(config: ml_collections.ConfigDict) -> None:
  """Quiets library logs, keeps TensorFlow off accelerators, tunes the CPU
  (`cpu_tuning.start`), joins the cluster, resolves "auto" dtypes
  (`dtypes.resolve`).

  Raises:
    errors.ConfigError: the config's CPU or cluster settings are wrong.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TensorFlow only feeds data; keep it off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], "GPU")
  tuning = cpu_tuning.start(config)
  distributed.initialize(config)
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info("%s.", tuning)
  choice = dtypes.resolve(config)
  if choice:
    logging.info(choice)


# How ml_collections begins the OSError of every read of a config whose
# file failed to load.
_NOT_LOADED = "Configuration is not available because of an earlier failure"


def _config_load_failure(e: OSError) -> str:
  """The one line for a `--config` file that cannot be loaded."""
  # ml_collections reports a missing or broken config file as an OSError
  # whose last line names the cause.
  cause = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
  if cause.startswith(_NOT_LOADED):
    cause = cause.partition(": ")[2]
  return (f"error: Cannot load the --config file ({cause}): pass an "
          "existing config file such as configs/shapes.py.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a misspelt `--config.FIELD` or a config file
  that cannot be loaded as one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except OSError as e:
    # An override (`--config.FIELD=...`) reads the config while the flags
    # are parsed, so a file that failed to load fails here, not in `run`.
    if not str(e).startswith(_NOT_LOADED):
      raise
    sys.exit(_config_load_failure(e))
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a field the config
    # does not have.
    field = str(e).strip("\"'")
    sys.exit(f"error: The config has no field {field!r}: check the spelling "
             "of the --config.* overrides against configs/default.py.")


def run(get_config: Callable[[], ml_collections.ConfigDict],
        work: Callable[[ml_collections.ConfigDict], Any]) -> Any:
  """Loads the config, starts the process and runs an entry point's work.

  A `UserError` (or a config file that cannot be loaded) ends the process
  with its one-line message and exit status 1; any other exception is a bug
  and keeps its traceback.

  Args:
    get_config: reads the `--config` flag (loading happens on first read).
    work: what the entry point does with the config.

  Returns:
    What `work` returns.
  """
  try:
    config = get_config()
    config.keys()  # The flag loads the file lazily, on first use.
  except OSError as e:
    sys.exit(_config_load_failure(e))
  try:
    start(config)
    return work(config)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
