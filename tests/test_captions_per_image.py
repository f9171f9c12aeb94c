"""K reference captions per image in a training batch
(`config.captions_per_image`, ruotianluo's seq_per_img)."""

import functools
import os

from batches import fake_batch
import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax import train
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib


def _examples(counts):
  """Image i has counts[i] references, "w{i} r{j}"; ids are i."""
  texts = [[f"w{i} r{j}" for j in range(n)] for i, n in enumerate(counts)]
  return tf.data.Dataset.from_generator(
      lambda: ({"texts": t, "image_id": np.int64(i)}
               for i, t in enumerate(texts)),
      output_signature={"texts": tf.TensorSpec([None], tf.string),
                        "image_id": tf.TensorSpec([], tf.int64)})


def _batches(counts, per_image, seed=0, skip=0, num=3):
  config = tiny.get_config()
  config.captions_per_image = per_image
  config.batch_size = 4
  config.shuffle_buffer_size = 8
  words = [f"w{i}" for i in range(len(counts))] + [f"r{j}" for j in range(9)]
  vocab = vocab_lib.Vocabulary(list(vocab_lib.SPECIALS) + words)
  ds = input_pipeline.sample_captions(
      _examples(counts), config, vocab, seed=seed, process_count=1,
      skip_batches=skip)
  return vocab, [b["tokens"] for b in ds.take(num).as_numpy_iterator()]


def test_each_image_gets_k_distinct_references():
  vocab, batches = _batches([5, 5, 5, 5, 2, 5, 5, 5], per_image=3)
  for tokens in batches:
    assert tokens.shape == (4, 3, tiny.get_config().max_caption_length + 2)
    for rows in tokens:
      captions = [" ".join(vocab.decode(r)) for r in rows]
      image = {c.split()[0] for c in captions}
      assert len(image) == 1  # All K rows caption the same image.
      if image != {"w4"}:
        assert len(set(captions)) == 3  # Distinct references.
      else:  # Two references: the shuffled pair, then round again.
        assert captions[0] == captions[2] != captions[1]


def test_the_stream_is_a_function_of_the_seed_and_resumes_exactly():
  counts = [5, 3, 5, 7, 5, 5, 1, 5]
  _, first = _batches(counts, per_image=5, seed=3, num=4)
  _, again = _batches(counts, per_image=5, seed=3, num=4)
  _, resumed = _batches(counts, per_image=5, seed=3, skip=2, num=2)
  _, other = _batches(counts, per_image=5, seed=4, num=4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(first[2:], resumed):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_k_rows_per_image_equal_the_image_repeated_with_each_caption():
  """The step with [b, K, T] tokens is the step on b * K rows whose images
  repeat: the encoder runs once per image, the loss is the same."""
  config = tiny.get_config()
  config.warmup_steps = 0
  vocab_size, k = 20, 2
  batch = fake_batch(config, vocab_size, config.batch_size * k)
  images = batch["image"][::k]  # [b, S, S, 3]
  grouped = {"image": images,
             "tokens": batch["tokens"].reshape(config.batch_size, k, -1)}
  repeated = {"image": np.repeat(images, k, axis=0), "tokens": batch["tokens"]}
  rng = jax.random.key(7)
  p_train_step, _ = step_lib.compile_steps(config)
  devices = jax.local_device_count()
  results = []
  for b in (grouped, repeated):
    state = state_lib.create_train_state(jax.random.key(0), config,
                                         vocab_size)
    sharded = input_pipeline.shard(b, devices)
    state, metrics = p_train_step(state, sharded, rng)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (params1, m1), (params2, m2) = results
  for key in ("loss", "xent", "attention_loss", "accuracy"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5, err_msg=key)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-4,
                                 atol=2e-6), params1, params2)


def test_self_critical_runs_refuse_k_captions():
  config = tiny.get_config()
  config.objective = "scst"
  config.captions_per_image = 5
  with pytest.raises(errors.ConfigError, match="captions_per_image must be 1"):
    config_checks.validate(config)
  config.objective = "xe"
  config.captions_per_image = 0
  with pytest.raises(errors.ConfigError, match="captions_per_image must be"):
    config_checks.validate(config)


@pytest.mark.slow
def test_a_run_with_k_captions_resumes_exactly(tiny_data_dir, tmp_path):
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  config.captions_per_image = 5
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  config.num_eval_examples = 4
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  config.num_train_steps = 2
  split = str(tmp_path / "split")
  train.train_and_evaluate(config, split)
  config.num_train_steps = 4
  train.train_and_evaluate(config, split)
  a = restore.restore_checkpoint(os.path.join(straight, "checkpoints"))
  b = restore.restore_checkpoint(os.path.join(split, "checkpoints"))
  assert a.step == b.step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params),
               jax.device_get(b.params))
