"""Self-critical sequence training (scst.py) on two fake CPU devices."""

import json
import os
import shutil

from batches import fake_batch
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax import cider
from visionspeak_jax import decoding
from visionspeak_jax import fast_decoder
from visionspeak_jax import input_pipeline
from visionspeak_jax import model
from visionspeak_jax import restore
from visionspeak_jax import scst
from visionspeak_jax import train
from visionspeak_jax import vocabulary as vocab_lib


def _scst_config(data_dir, init_from=""):
  config = tiny.get_config()
  config.data_dir = data_dir
  config.objective = "scst"
  config.scst.num_samples = 3
  config.init_from = init_from
  config.learning_rate = 1e-3
  config.warmup_steps = 0
  return config


def test_words_stop_at_eos_and_drop_bos_and_pad():
  assert scst.words([vocab_lib.BOS_ID, 7, 8, vocab_lib.EOS_ID, 9]) == (7, 8)
  assert scst.words([5, vocab_lib.PAD_ID, 6]) == (5, 6)
  assert scst.words([vocab_lib.EOS_ID]) == ()


def test_advantages_against_the_others_mean_or_greedy():
  rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.6]])
  np.testing.assert_allclose(scst.advantages(rewards),
                             [[-1.5, 0.0, 1.5], [-0.3, -0.3, 0.6]])
  np.testing.assert_allclose(scst.advantages(rewards, np.array([2.0, 0.1])),
                             [[-1.0, 0.0, 1.0], [-0.1, -0.1, 0.5]])


def test_training_batches_carry_every_reference(tiny_data_dir):
  config = _scst_config(tiny_data_dir)
  source = input_pipeline.TfdsSource(config)
  vocab = vocab_lib.Vocabulary.build(source.captions(config.train_split))
  batch = next(source.train_dataset(vocab, seed=0).as_numpy_iterator())
  length = config.max_caption_length + 2
  assert batch["references"].shape == (config.batch_size, 5, length)
  for tokens, refs in zip(batch["tokens"], batch["references"]):
    # The trained caption is one of the image's references.
    assert any((tokens == r).all() for r in refs)
    assert all(r[0] == vocab_lib.BOS_ID for r in refs)
  first = next(iter(source.references(config.train_split)))
  assert len(first) == 5 and all(isinstance(c, str) for c in first)


def test_update_scores_samples_as_the_sampler_drew_them():
  """teacher_forced on a sample gives the log-probability it was drawn with."""
  config = tiny.get_config()
  vocab_size = 30
  params, batch_stats = model.init(jax.random.key(0), config, vocab_size)
  batch = fake_batch(config, vocab_size, 4)
  feats, _ = model.features(model.create_encoder(config), params, batch_stats,
                            batch, train=False)
  weights = fast_decoder.decoding_weights(params["decoder"], None)
  step_fn, start = model.make_step_fn(weights, feats)
  k, length = 3, 8
  drawn = decoding.sample(
      step_fn, jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), start),
      4 * k, length, jax.random.key(5), bos_id=vocab_lib.BOS_ID,
      eos_id=vocab_lib.EOS_ID, pad_id=vocab_lib.PAD_ID)
  samples = drawn.tokens
  tokens_in = jnp.concatenate(
      [jnp.full_like(samples[:, :1], vocab_lib.BOS_ID), samples[:, :-1]], 1)
  logits, _, _ = fast_decoder.teacher_forced(
      params["decoder"], jnp.repeat(feats, k, axis=0), tokens_in)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                 samples[..., None], -1)[..., 0]
  # Random weights draw PAD and BOS too: they count until the first EOS.
  assert (samples[:, :-1] == vocab_lib.PAD_ID).any()
  mask = scst.sequence_mask(samples)
  np.testing.assert_allclose((logprobs * mask).sum(1), drawn.scores,
                             rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def xe_run(tiny_data_dir, tmp_path_factory):
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  config.num_train_steps = 30
  config.eval_every_steps = 30
  workdir = str(tmp_path_factory.mktemp("xe"))
  train.train_and_evaluate(config, workdir)
  return workdir


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_scst_run_from_a_cross_entropy_run_resumes_exactly(
    tiny_data_dir, xe_run, tmp_path):
  config = _scst_config(tiny_data_dir, init_from=xe_run)
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  straight = str(tmp_path / "straight")
  results = train.train_and_evaluate(config, straight)
  assert 0.0 <= results["cider"]
  records = [r for r in _records(straight) if r["split"] == "train"]
  for r in records:
    assert np.isfinite(r["loss"]) and 0.0 <= r["reward"]
    assert r["sample_length"] >= 1
  assert os.path.exists(os.path.join(straight, scst.DF_FILE))

  # The same run stopped after its step-2 checkpoint and resumed ends with
  # the same weights: the samples and rewards of steps 3 and 4 recur.
  halves = str(tmp_path / "halves")
  shutil.copytree(straight, halves)
  shutil.rmtree(os.path.join(halves, "checkpoints", "4"))
  shutil.rmtree(os.path.join(halves, "best"))
  train.train_and_evaluate(config, halves)
  a = restore.restore_run(straight)
  b = restore.restore_run(halves)
  assert a.step == b.step == 4
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  # And SCST moved the decoder away from where the cross-entropy run ended.
  start = restore.restore_run(xe_run)
  assert a.vocab.words == start.vocab.words
  moved = jax.tree.map(lambda x, y: not np.array_equal(x, y),
                       a.params["decoder"], start.params["decoder"])
  assert any(jax.tree.leaves(moved))


def test_greedy_baseline_and_mixed_cross_entropy(tiny_data_dir, xe_run,
                                                 tmp_path):
  config = _scst_config(tiny_data_dir, init_from=xe_run)
  config.scst.baseline = "greedy"
  config.scst.xe_weight = 0.5
  config.num_train_steps = 2
  config.eval_every_steps = 2
  workdir = str(tmp_path / "greedy")
  train.train_and_evaluate(config, workdir)
  records = [r for r in _records(workdir) if r["split"] == "train"]
  assert all("greedy_reward" in r for r in records)
  assert all(r["xent"] > 0 for r in records)


def test_rewards_are_cider_d_of_the_words_and_zero_without_references():
  df = cider.DocumentFrequencies.build([[(5, 6, 7)], [(5, 8)], [(9,)]])
  step = scst.SelfCriticalStep.__new__(scst.SelfCriticalStep)
  step.scorer = cider.CiderD(df)
  bos, eos = vocab_lib.BOS_ID, vocab_lib.EOS_ID
  # Image 0 has one reference; image 1's only caption had no words.
  references = np.array([[[bos, 5, 6, 7, eos], [0, 0, 0, 0, 0]],
                         [[bos, eos, 0, 0, 0], [0, 0, 0, 0, 0]]])
  samples = np.array([[5, 6, 7, eos], [5, 6, eos, 0],
                      [5, eos, 0, 0], [9, eos, 0, 0]])
  rewards = step.rewards(samples, references)
  want = step.scorer.score([(5, 6, 7), (5, 6)], [[(5, 6, 7)]], [0, 0])
  np.testing.assert_allclose(rewards[:2], want)
  assert rewards[0] > rewards[1] > 0
  np.testing.assert_array_equal(rewards[2:], [0.0, 0.0])
