"""Multi-host start-up: `jax.distributed.initialize` when a run asks for it.

Three ways in, chosen by the config (never by flags read here):
  - `config.coordinator_address` set: an explicit cluster (any hosts), with
    `config.num_processes` and `config.process_id`.
  - `config.distributed == "auto"` (default) and a multi-process SLURM job or
    a multi-host TPU VM slice detected from the environment: JAX finds the
    coordinator itself.
  - otherwise: a single process; nothing to do.
"""

import os

from absl import logging
import jax
import ml_collections

from visionspeak_jax import errors

MODES = ("auto", "yes", "no")


def cluster_detected(environ=None) -> bool:
  """Whether the environment is a multi-process SLURM job or TPU pod host."""
  env = os.environ if environ is None else environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1


def check_mode(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError unless `config.distributed` is one of MODES."""
  if config.distributed not in MODES:
    raise errors.ConfigError(
        f"config.distributed must be one of {', '.join(MODES)}, got "
        f"{config.distributed!r}: fix --config.distributed.")


def initialize(config: ml_collections.ConfigDict, environ=None) -> bool:
  """Starts the JAX distributed runtime if this run is multi-process.

  Must run before anything asks JAX for devices.

  Args:
    config: the run config (`distributed`, `coordinator_address`,
      `num_processes`, `process_id`).
    environ: the environment to inspect (default: `os.environ`).

  Returns:
    Whether `jax.distributed.initialize` was called.

  Raises:
    errors.ConfigError: an unknown mode or an incomplete explicit cluster.
  """
  check_mode(config)
  mode = config.distributed
  if mode == "no":
    return False
  if config.coordinator_address:
    if config.num_processes < 1 or not (
        0 <= config.process_id < config.num_processes):
      raise errors.ConfigError(
          "With --config.coordinator_address, also set "
          "--config.num_processes (>= 1) and --config.process_id "
          "(0 .. num_processes - 1).")
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)
  elif mode == "yes" or cluster_detected(environ):
    jax.distributed.initialize()
  else:
    return False
  logging.info("Distributed JAX: process %d of %d.", jax.process_index(),
               jax.process_count())
  return True
