"""The CPU split into one JAX device per core (`runtime.split_cpu`)."""

import os
import subprocess
import sys

import pytest

from configs import shapes
from visionspeak_jax import errors
from visionspeak_jax import runtime

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cores,batch,eval_batch,wanted,count", [
    (2, 32, 64, 0, 2),   # The default run on two cores.
    (1, 32, 64, 0, 1),
    (0, 32, 64, 0, 1),   # No affinity reported: one device.
    (3, 32, 64, 0, 2),   # 3 divides neither batch.
    (16, 12, 64, 0, 4),  # The most that divide both.
    (16, 32, 64, 0, 16),
    (2, 32, 64, 1, 1),   # Asked for.
    (2, 32, 64, 4, 4),   # Asked for, more than cores.
])
def test_cpu_device_count(cores, batch, eval_batch, wanted, count):
  config = shapes.get_config()
  config.batch_size, config.eval_batch_size = batch, eval_batch
  config.cpu_devices = wanted
  assert runtime.cpu_device_count(config, cores) == count


def test_a_negative_count_is_one_sentence():
  config = shapes.get_config()
  config.cpu_devices = -1
  with pytest.raises(errors.ConfigError,
                     match=r"^config.cpu_devices must be a whole number >= 0 "
                     r"\(0: one device per core\), got -1: fix "
                     r"--config.cpu_devices.$"):
    runtime.cpu_device_count(config, 2)


_CHILD = """
import os, sys
import jax
from configs import shapes
from visionspeak_jax import runtime
config = shapes.get_config()
config.cpu_devices = int(sys.argv[1])
split = runtime.split_cpu(config)
auto = runtime.cpu_device_count(config, len(os.sched_getaffinity(0)))
print(split, auto, jax.local_device_count(), jax.default_backend())
"""


def _child(cpu_devices, xla_flags=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", _CHILD, str(cpu_devices)],
                        cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=120, check=True)
  return proc.stdout.split()


def test_split_cpu_makes_the_devices_before_jax_starts():
  split, auto, devices, backend = _child(0)
  assert backend == "cpu"
  assert split == auto == devices  # One per core (as the batch allows).
  assert _child(3)[::2] == ["3", "3"]
  # An explicit split in XLA_FLAGS wins.
  assert _child(3, "--xla_force_host_platform_device_count=5")[::2] == [
      "None", "5"]
