"""The CPU split into one JAX device per core (`cpu_tuning.split_cpu`) and the
XLA:CPU flags every run sets (`cpu_tuning.set_cpu_xla_flags`)."""

import os
import subprocess
import sys

import pytest

from configs import shapes
from visionspeak_jax import errors
from visionspeak_jax.platform import cpu_tuning

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
  assert cpu_tuning.cpu_device_count(config, cores) == count


def test_a_negative_count_is_one_sentence():
  config = shapes.get_config()
  config.cpu_devices = -1
  with pytest.raises(errors.ConfigError,
                     match=r"^config.cpu_devices must be a whole number >= 0 "
                     r"\(0: one device per core\), got -1: fix "
                     r"--config.cpu_devices.$"):
    cpu_tuning.cpu_device_count(config, 2)


_CHILD = """
import os, sys
import jax
from configs import shapes
from visionspeak_jax.platform import cpu_tuning
config = shapes.get_config()
config.cpu_devices = int(sys.argv[1])
split = cpu_tuning.split_cpu(config)
auto = cpu_tuning.cpu_device_count(config, len(os.sched_getaffinity(0)))
print(split, auto, jax.local_device_count(), jax.default_backend())
"""


def _run(code, arg, xla_flags=None):
  """The words `code` prints, run as a fresh process with `arg`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", code, arg], cwd=_ROOT,
                        env=env, capture_output=True, text=True, timeout=120,
                        check=True)
  return proc.stdout.split()


def _child(cpu_devices, xla_flags=None):
  return _run(_CHILD, str(cpu_devices), xla_flags)


def test_split_cpu_makes_the_devices_before_jax_starts():
  split, auto, devices, backend = _child(0)
  assert backend == "cpu"
  assert split == auto == devices  # One per core (as the batch allows).
  assert _child(3)[::2] == ["3", "3"]
  # An explicit split in XLA_FLAGS wins.
  assert _child(3, "--xla_force_host_platform_device_count=5")[::2] == [
      "None", "5"]


def test_xla_defines_its_flags_and_not_others():
  for name, _ in cpu_tuning.CPU_XLA_FLAGS:
    assert cpu_tuning.xla_defines(name)
  assert cpu_tuning.xla_defines("xla_force_host_platform_device_count")
  assert not cpu_tuning.xla_defines("xla_cpu_no_such_flag_anywhere")
  # A flag's name only in part is not a flag.
  assert not cpu_tuning.xla_defines("xla_cpu_enable_concurrency")


def test_set_cpu_xla_flags_adds_only_what_is_missing(monkeypatch):
  ours = [f"--{name}={value}" for name, value in cpu_tuning.CPU_XLA_FLAGS]
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert cpu_tuning.set_cpu_xla_flags() == ours
  assert os.environ["XLA_FLAGS"] == " ".join(ours)
  assert cpu_tuning.set_cpu_xla_flags() == []  # Once is enough.
  # The user's own flags stay; theirs wins where they name one of ours.
  first = cpu_tuning.CPU_XLA_FLAGS[0][0]
  given = f"--xla_cpu_enable_fast_math=false --{first}=true"
  monkeypatch.setenv("XLA_FLAGS", given)
  assert cpu_tuning.set_cpu_xla_flags() == ours[1:]
  assert os.environ["XLA_FLAGS"] == " ".join([given, *ours[1:]])
  # A flag this jaxlib does not have would end the process: left out.
  monkeypatch.setattr(cpu_tuning, "CPU_XLA_FLAGS",
                      (("xla_cpu_gone", "1"), *cpu_tuning.CPU_XLA_FLAGS[1:]))
  monkeypatch.delenv("XLA_FLAGS")
  assert cpu_tuning.set_cpu_xla_flags() == ours[1:]
  assert os.environ.get("XLA_FLAGS", "") == " ".join(ours[1:])


# Two independent chains dot -> tanh -> dot: XLA's schedule runs one chain
# after the other (depth first) or interleaves them (breadth first).
_SCHEDULE_CHILD = """
import sys
import jax
import jax.numpy as jnp
from visionspeak_jax.platform import cpu_tuning
if sys.argv[1] == "set":
  cpu_tuning.set_cpu_xla_flags()

def chains(x, y, w):
  return jnp.tanh(x @ w) @ w, jnp.tanh(y @ w) @ w

z = jnp.ones((64, 64))
text = jax.jit(chains).lower(z, z, z).compile().as_text()
entry = text[text.index("ENTRY"):].splitlines()[1:]
# Each instruction's name: "%name = shape op(operands)".
names = [line.split("=", 1)[0].strip() for line in entry if "=" in line]
print(" ".join("tanh" if "tanh" in name else "dot" for name in names
               if "tanh" in name or "dot" in name or "ynn_fusion" in name))
"""


def test_the_flags_set_in_the_process_order_its_programs():
  # XLA's default interleaves the chains; set before JAX starts, the flags
  # make it finish one chain first.
  assert _run(_SCHEDULE_CHILD, "default") == [
      "dot", "dot", "tanh", "tanh", "dot", "dot"]
  assert _run(_SCHEDULE_CHILD, "set") == [
      "dot", "tanh", "dot", "dot", "tanh", "dot"]
