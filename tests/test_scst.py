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
from visionspeak_jax import train
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.evaluation import cider
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoding
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.run import restore
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.training import scst


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
  bos, eos, pad = vocab_lib.BOS_ID, vocab_lib.EOS_ID, vocab_lib.PAD_ID
  assert scst.cider_tokens([bos, 7, 8, eos, 9], eos=False) == (7, 8)
  assert scst.cider_tokens([bos, 7, 8, eos, 9], eos=True) == (7, 8, eos)
  assert scst.cider_tokens([5, pad, 6], eos=True) == (5, 6)  # Cut: no EOS.
  assert scst.cider_tokens([eos], eos=False) == ()
  assert scst.cider_tokens([eos, pad], eos=True) == (eos,)


def test_training_references_are_every_caption_whole():
  vocab = vocab_lib.Vocabulary.build(["a red circle", "a blue square"])
  long = " ".join(["a red circle"] * 20)  # 60 words: longer than any cut.
  captions = [(7, ["a red circle", "a blue square", "red", long, "?", "x y"]),
              (9, ["!", ""])]
  eos = vocab_lib.EOS_ID
  refs = scst.training_references(captions, vocab, eos=True)
  encoded = [tuple(vocab.encode(c)) for c in captions[0][1]]
  # Six captions; the one of punctuation only has no words.
  assert refs[7] == [e + (eos,) for e in encoded if e]
  assert len(refs[7]) == 5 and len(refs[7][3]) == 61
  assert refs[9] == [()]  # No words at all: every sample scores 0.
  assert scst.training_references(captions, vocab, eos=False)[7] == [
      e for e in encoded if e]


def test_advantages_against_the_others_mean_or_greedy():
  rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.6]])
  np.testing.assert_allclose(scst.advantages(rewards),
                             [[-1.5, 0.0, 1.5], [-0.3, -0.3, 0.6]])
  np.testing.assert_allclose(scst.advantages(rewards, np.array([2.0, 0.1])),
                             [[-1.0, 0.0, 1.0], [-0.1, -0.1, 0.5]])


def test_training_batches_name_their_images(tiny_data_dir):
  config = _scst_config(tiny_data_dir)
  source = input_pipeline.TfdsSource(config)
  vocab = vocab_lib.Vocabulary.build(source.captions(config.train_split))
  references = scst.training_references(
      source.references(config.train_split), vocab, eos=False)
  batch = next(source.train_dataset(vocab, seed=0).as_numpy_iterator())
  assert batch["image_id"].shape == (config.batch_size,)
  assert batch["image_id"].dtype == np.int32
  for tokens, image_id in zip(batch["tokens"], batch["image_id"]):
    # The trained caption is one of that image's references.
    assert scst.cider_tokens(tokens, eos=False) in references[int(image_id)]
  image_id, first = next(iter(source.references(config.train_split)))
  assert isinstance(image_id, int) and image_id in references
  assert len(first) == 5 and all(isinstance(c, str) for c in first)
  # A cross-entropy run's batches carry no ids.
  config.objective = "xe"
  batch = next(source.train_dataset(vocab, seed=0).as_numpy_iterator())
  assert set(batch) == {"image", "tokens"}


def test_update_scores_samples_as_the_sampler_drew_them():
  """teacher_forced on a sample gives the log-probability it was drawn with."""
  config = tiny.get_config()
  vocab_size = 30
  params, batch_stats = captioner.init(jax.random.key(0), config, vocab_size)
  batch = fake_batch(config, vocab_size, 4)
  feats, _ = captioner.encode(captioner.create_encoder(config), params,
                              batch_stats, batch, train=False,
                              grid_hw=captioner.grid(config))
  weights = fast_decoder.decoding_weights(params["decoder"], None)
  step_fn, start = captioner.make_step_fn(weights, feats)
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


@pytest.mark.slow
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
  assert os.path.exists(os.path.join(straight, "cider_df_eos.npz"))

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


@pytest.mark.slow
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


@pytest.mark.parametrize("eos", [False, True])
def test_rewards_are_cider_d_of_the_words_and_zero_without_references(eos):
  e = vocab_lib.EOS_ID
  end = (e,) if eos else ()
  # Image 40 has two references; image 41's only caption had no words.
  references = {40: [(5, 6, 7) + end, (5, 8) + end], 41: [()],
                42: [(9,) + end]}
  df = cider.DocumentFrequencies.build(list(references.values()))
  config = tiny.get_config()
  config.scst.cider_eos = eos
  step = scst.SelfCriticalStep.__new__(scst.SelfCriticalStep)
  step.config, step.scorer = config, cider.CiderD(df)
  step.references = references
  samples = np.array([[5, 6, 7, e], [5, 6, e, 0],
                      [5, e, 0, 0], [9, e, 0, 0]])
  rewards = step.rewards(samples, np.array([40, 41]))
  want = step.scorer.score([(5, 6, 7) + end, (5, 6) + end],
                           [references[40]], [0, 0])
  np.testing.assert_allclose(rewards[:2], want)
  assert rewards[0] > rewards[1] > 0
  np.testing.assert_array_equal(rewards[2:], [0.0, 0.0])


def test_eos_n_grams_reward_a_finished_ending():
  """With EOS, a caption that stops mid-phrase scores below its finish.

  Without it, the unfinished "a red circle on a" holds only n-grams the
  references have, and CIDEr-D's length penalty is its only cost.
  """
  vocab = vocab_lib.Vocabulary.build(
      ["a red circle on a blue square", "a red circle above a blue square",
       "a green triangle"])
  refs = [(1, ["a red circle on a blue square",
               "a red circle above a blue square"]),
          (2, ["a green triangle", "a green triangle left of a circle"])]
  scores = {}
  for eos in (False, True):
    references = scst.training_references(refs, vocab, eos=eos)
    scorer = cider.CiderD(cider.DocumentFrequencies.build(
        list(references.values())))
    end = (vocab_lib.EOS_ID,) if eos else ()
    finished = tuple(vocab.encode("a red circle on a blue square")) + end
    unfinished = tuple(vocab.encode("a red circle on a")) + end
    scores[eos] = scorer.score([finished, unfinished], [references[1]],
                               [0, 0])
  gap = {eos: s[0] - s[1] for eos, s in scores.items()}
  assert gap[True] > gap[False] > 0
