"""Training tests on two fake CPU devices (see conftest.py)."""

import functools
import json
import os

from batches import fake_batch
import jax
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax import train
from visionspeak_jax.platform import cpu_tuning
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_writes_checkpoints_and_resumes(tiny_data_dir, tmp_path,
                                              monkeypatch):
  assert jax.local_device_count() == 2

  class NoMeteor:

    def __init__(self):
      raise AssertionError("a METEOR JVM was started")

  # The tiny config scores without Java: no JVM may start.
  monkeypatch.setattr(train.metrics_lib, "Meteor", NoMeteor)
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  # Six steps teach nothing; the numbers must still be well-formed scores,
  # and the ones the run logged.
  for key in ("bleu4", "rouge_l", "content_f1", "grounding",
              "grounding_chance"):
    assert 0.0 <= results[key] <= 1.0, key
  assert results["num_images"] == config.num_eval_examples
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 6
  vocab, saved_config = ckpt.restore_metadata()
  assert saved_config.model.hidden_dim == config.model.hidden_dim
  assert os.path.exists(os.path.join(workdir, "vocab.json"))
  best = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"))
  assert best.latest_step() == 6
  first = _records(workdir)
  assert [r["step"] for r in first if r["split"] == "train"] == [2, 4, 6]
  assert first[-1] == {"step": 6, "split": "test", **results}

  # Restart with a longer schedule: it must pick up at step 6, not 0.
  config.num_train_steps = 8
  train.train_and_evaluate(config, workdir)
  second = _records(workdir)[len(first):]
  assert [r["step"] for r in second if r["split"] == "train"] == [8]
  reopened = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert reopened.latest_step() == 8
  state = state_lib.create_train_state(jax.random.key(0), config, len(vocab))
  restored = reopened.restore_state(state)
  assert int(restored.step) == 8
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                         state.params, restored.params)
  assert any(jax.tree.leaves(changed))


def test_a_best_metric_the_data_lacks_stops_the_run_at_start(
    tiny_data_dir, tmp_path, monkeypatch):
  real_create = train.sources.create

  def without_objects(config, workdir):
    source = real_create(config, workdir)
    source.has_objects = False  # As coco_captions' examples.
    return source

  monkeypatch.setattr(train.sources, "create", without_objects)
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  config.best_metric = "grounding"
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError,
                     match="config.best_metric is grounding, which "
                     "evaluations on shapes_captions/tiny do not report"):
    train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "metrics.jsonl").exists()
  assert not os.listdir(workdir / "checkpoints")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(checkpoint_lib.CheckpointError, match="No checkpoint"):
    ckpt.restore_metadata()
  assert not (tmp_path / "empty").exists()  # A reader creates nothing.


@pytest.mark.slow
def test_the_second_step_does_not_compile_again(compile_events):
  # A new state sits uncommitted on one device, the step returns it
  # replicated over its devices: unplaced, the second call compiled the
  # whole step again. Each round has its own step function (and cache).
  config = tiny.get_config()
  vocab_size = 20
  batch = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]),
                       fake_batch(config, vocab_size, config.batch_size))
  second_call = {}
  for place in (False, True):
    p_train_step, _ = step_lib.compile_steps(config)
    state = state_lib.create_train_state(jax.random.key(0), config,
                                         vocab_size)
    if place:
      state = step_lib.place_state(state)
    state, _ = p_train_step(state, batch, jax.random.key(1))
    first = len(compile_events)
    p_train_step(state, batch, jax.random.key(2))
    second_call[place] = len(compile_events) - first
  assert second_call == {False: 1, True: 0}


@pytest.mark.slow
def test_the_step_tuned_for_cpu_trains_alike_and_compiles_once(
    compile_events):
  # The training loop's step on a CPU: -O2 rounds differently from XLA's
  # default, takes the same step, and compiles once for the whole run.
  config = tiny.get_config()
  config.warmup_steps = 0  # Take a real step at step 0.
  vocab_size = 20
  batch = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]),
                       fake_batch(config, vocab_size, config.batch_size))
  results = []
  for tuned in (False, True):
    p_train_step, _ = step_lib.compile_steps(config)
    if tuned:
      p_train_step = cpu_tuning.compile_train_step(p_train_step)
    state = step_lib.place_state(state_lib.create_train_state(
        jax.random.key(0), config, vocab_size))
    before = len(compile_events)
    for i in range(3):
      state, metrics = p_train_step(state, batch, jax.random.key(i))
    if tuned:
      assert len(compile_events) - before == 1
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (params, metrics), (tuned_params, tuned_metrics) = results
  for key in ("loss", "xent", "grad_norm"):
    np.testing.assert_allclose(metrics[key], tuned_metrics[key], rtol=1e-5,
                               err_msg=key)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6), params, tuned_params)


@pytest.mark.slow
def test_two_devices_match_one_device_for_the_same_global_batch():
  config = tiny.get_config()
  config.warmup_steps = 0  # Take a real step at step 0.
  vocab_size = 20
  batch = fake_batch(config, vocab_size, config.batch_size)
  rng = jax.random.key(7)
  results = []
  for devices in (jax.local_devices()[:1], jax.local_devices()[:2]):
    state = state_lib.create_train_state(jax.random.key(0), config,
                                         vocab_size)
    p_train_step, _ = step_lib.compile_steps(config, devices=devices)
    sharded = jax.tree.map(
        lambda x, n=len(devices): x.reshape((n, -1) + x.shape[1:]), batch)
    for _ in range(2):
      state, metrics = p_train_step(state, sharded, rng)
    results.append((jax.device_get(state.params),
                    jax.device_get(state.batch_stats),
                    jax.device_get(metrics)))
  (params1, stats1, m1), (params2, stats2, m2) = results
  for key in ("loss", "xent", "attention_loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5, err_msg=key)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4,
                                 atol=2e-6), params1, params2)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4,
                                 atol=2e-6), stats1, stats2)
