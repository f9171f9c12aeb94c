"""Process start-up shared by the command-line entry points."""

import glob
import logging as pylogging
import mmap
import os
import sys
from typing import Any, Callable

from absl import app
from absl import logging
import jax
import jaxlib
import ml_collections

from visionspeak_jax import distributed
from visionspeak_jax import errors
from visionspeak_jax import huge_pages

# Libraries whose INFO lines would bury a run's own log.
_QUIET_INFO = ("/orbax/", "/tensorflow_datasets/")


class _QuietLibraries(pylogging.Filter):
  """Drops INFO (and lower) records logged from chatty libraries."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return (record.levelno > pylogging.INFO or
            not any(part in record.pathname for part in _QUIET_INFO))


def cpu_device_count(config: ml_collections.ConfigDict, cores: int) -> int:
  """The JAX devices to split a CPU of `cores` cores into for `config`.

  `config.cpu_devices`, or for 0 the most devices, at most one per core,
  that divide both `batch_size` and `eval_batch_size`.

  Raises:
    errors.ConfigError: `cpu_devices` is negative or not a whole number.
  """
  wanted = config.cpu_devices
  if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 0:
    raise errors.ConfigError(
        f"config.cpu_devices must be a whole number >= 0 (0: one device per "
        f"core), got {wanted!r}: fix --config.cpu_devices.")
  if wanted:
    return wanted
  return next(n for n in range(max(cores, 1), 0, -1)
              if config.batch_size % n == 0 and config.eval_batch_size % n == 0)


def _in_xla_flags(name: str) -> bool:
  """Whether XLA_FLAGS sets the flag `name` already (the user's wins)."""
  return name in os.environ.get("XLA_FLAGS", "")


def split_cpu(config: ml_collections.ConfigDict) -> int | None:
  """Splits the CPU into `cpu_device_count` JAX devices; before JAX starts.

  Measured on the default shapes run (2-core Intel Xeon): 78 ms a step on
  one device, 57-60 ms on two (`README.md`). An explicit split in
  `XLA_FLAGS` or `jax_num_cpu_devices` is left as it is.

  Returns:
    The device count asked for, or None where the split was already set.

  Raises:
    errors.ConfigError: a wrong `config.cpu_devices`.
  """
  count = cpu_device_count(config, len(os.sched_getaffinity(0)))
  if (_in_xla_flags("xla_force_host_platform_device_count")
      or jax.config.jax_num_cpu_devices != -1):
    return None
  jax.config.update("jax_num_cpu_devices", count)
  return count


# XLA:CPU flags every run adds to XLA_FLAGS. The concurrency-optimised
# scheduler orders a program breadth first so that independent operations
# can run at once; with the cores already busy (one JAX device per core, or
# one device's matmuls spread over all of them) they only contend. Depth
# first, on the default run (2-core Intel Xeon, A/B in separate processes,
# the same results): a step 57.4 -> 54.0 ms on two devices, 82.2 -> 78.3 ms
# on one; the whole run 280 -> 266 s; the COCO-sized decoder step of
# benchmarks/benchmark.py unchanged (497 vs 495 ms). Passing it to one
# compile instead (`compiler_options`) gave only 57 ms.
CPU_XLA_FLAGS = (("xla_cpu_enable_concurrency_optimized_scheduler", "false"),)


def xla_defines(flag: str) -> bool:
  """Whether the installed XLA (jaxlib) has the flag `flag`.

  XLA ends the process on a flag in XLA_FLAGS it does not know, and flags
  come and go between releases; each flag's name is a string in the library
  that parses XLA_FLAGS (about 0.01 s to find).
  """
  needle = b"\0" + flag.encode() + b"\0"
  libraries = sorted(glob.glob(os.path.join(os.path.dirname(jaxlib.__file__),
                                            "*.so")),
                     key=os.path.getsize, reverse=True)
  for path in libraries:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0,
                                          access=mmap.ACCESS_READ) as data:
      if data.find(needle) >= 0:
        return True
  return False


def set_cpu_xla_flags() -> list[str]:
  """Adds `CPU_XLA_FLAGS` to XLA_FLAGS; before JAX starts, or no effect.

  A flag XLA_FLAGS names already keeps the value given there; one this
  jaxlib does not define is left out.

  Returns:
    The flags added, as written into XLA_FLAGS.
  """
  added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS
           if not _in_xla_flags(name) and xla_defines(name)]
  if added:
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), *added]).strip()
  return added


def start(config: ml_collections.ConfigDict) -> None:
  """Quiets library logs, keeps TensorFlow off accelerators, sets XLA's CPU
  flags (`set_cpu_xla_flags`), splits the CPU into devices (`split_cpu`),
  joins the cluster.

  Raises:
    errors.ConfigError: the config's CPU or cluster settings are wrong.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TensorFlow only feeds data; keep it off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], "GPU")
  xla_flags = set_cpu_xla_flags()
  split = split_cpu(config)
  distributed.initialize(config)
  logging.info("JAX process %d/%d, local devices: %s%s", jax.process_index(),
               jax.process_count(), jax.local_devices(),
               f" (the CPU split into {split}: --config.cpu_devices)"
               if (split or 0) > 1 and jax.default_backend() == "cpu" else "")
  if xla_flags and jax.default_backend() == "cpu":
    logging.info("XLA flags added: %s (runtime.CPU_XLA_FLAGS).",
                 " ".join(xla_flags))
  logging.info("Host memory: %s", huge_pages.describe())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a misspelt `--config.FIELD` as one line."""
  try:
    return app.parse_flags_with_usage(argv)
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
    # ml_collections reports a missing or broken config file as an OSError
    # whose last line names the cause.
    cause = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"error: Cannot load the --config file ({cause[-1]}): pass an "
             "existing config file such as configs/shapes.py.")
  try:
    start(config)
    return work(config)
  except errors.UserError as e:
    sys.exit(f"error: {e}")
