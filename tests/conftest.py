"""Test setup: two fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""),
     "--xla_force_host_platform_device_count=2"]).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the generated `shapes_captions/tiny` set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.data.datasets import shapes
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("shapes_captions/tiny", data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory):
  """A workdir of `configs/tiny.py` trained for two steps on a copy of the
  tiny data, the copy deleted: only the checkpoint is left."""
  import shutil  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from visionspeak_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny_run")
  data_dir = str(root / "tfds")
  shutil.copytree(tiny_data_dir, data_dir)
  config = tiny.get_config()
  config.data_dir = data_dir
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  config.num_eval_examples = 8
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir)
  shutil.rmtree(data_dir)
  return workdir


@pytest.fixture
def compile_events():
  """A list that gains an entry at each XLA compilation during the test."""
  import jax  # pylint: disable=g-import-not-at-top
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)
