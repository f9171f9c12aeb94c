"""Feature caches, decoder training on them, and learning-rate multipliers
(two fake CPUs)."""

import json
import os
import shutil

from batches import fake_batch
import jax
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax import train
from visionspeak_jax.data import feature_cache
from visionspeak_jax.data import sources
from visionspeak_jax.models import pretrained
from visionspeak_jax.platform import parallel
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import restore
from visionspeak_jax.tools import caption
from visionspeak_jax.tools import extraction
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib


def _config(data_dir, cache):
  config = tiny.get_config()
  config.data_dir = data_dir
  config.feature_cache_dir = cache
  config.extract_random_encoder = True
  return config


@pytest.fixture(scope="module")
def cache_dir(tiny_data_dir, tmp_path_factory):
  """The tiny shapes set's features through a random tiny ResNet."""
  root = tmp_path_factory.mktemp("features")
  config = _config(tiny_data_dir, str(root / "cache"))
  return extraction.extract(config, str(root / "unused_workdir"))


def test_extract_writes_index_and_shards(cache_dir, tiny_data_dir):
  with open(os.path.join(cache_dir, "index.json")) as f:
    index = json.load(f)
  assert index["resnet_size"] == "tiny" and index["image_size"] == 32
  assert index["num_regions"] == 16 and index["feature_dim"] == 32
  assert index["encoder_source"] == "random:seed=0"
  assert len(index["encoder_fingerprint"]) == 16
  assert index["splits"] == ["train", "validation", "test"]
  with open(os.path.join(cache_dir, "train",
                         "part-00000-of-00001.json")) as f:
    part = json.load(f)
  assert part["num_examples"] == 200 and len(set(part["image_ids"])) == 200
  config = _config(tiny_data_dir, cache_dir)
  config.data_source = "feature_cache"
  cache = sources.create(config, "unused")
  assert isinstance(cache, feature_cache.FeatureCache)
  assert cache.input_key == "features"
  assert cache.run_info == {
      "encoder_source": "random:seed=0",
      "encoder_fingerprint": index["encoder_fingerprint"]}
  examples = list(cache.eval_examples("validation", 3))
  assert examples[0].inputs.shape == (16, 32)
  assert examples[0].inputs.dtype == np.float16
  assert len(examples[0].references) == 5 and examples[0].objects
  assert isinstance(examples[0].objects[0]["bbox"], tuple)
  # Each process's share of the first 5, round-robin, as `parallel.share`.
  whole = list(cache.eval_examples("validation", 5))
  shares = [list(cache.eval_examples("validation", 5, process_index=i,
                                     process_count=2)) for i in range(2)]
  assert [len(s) for s in shares] == [3, 2]
  for ex, alone in zip(parallel.interleave(shares), whole, strict=True):
    assert ex.image_id == alone.image_id
    np.testing.assert_array_equal(ex.inputs, alone.inputs)


def test_cached_training_is_decoder_only_and_checkpoints(cache_dir,
                                                         tmp_path):
  # No TFDS data at all: captions, features and objects come from the cache.
  config = _config(str(tmp_path / "no_tfds"), cache_dir)
  config.data_source = "feature_cache"
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  config.num_eval_examples = 8
  workdir = str(tmp_path / "cached")
  results = train.train_and_evaluate(config, workdir)
  assert results["num_images"] == 8
  for key in ("bleu4", "content_f1", "grounding"):
    assert 0.0 <= results[key] <= 1.0, key
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 4
  vocab, _ = ckpt.restore_metadata()
  state = state_lib.create_train_state(jax.random.key(0), config, len(vocab),
                                       encoder=False)
  assert set(state.params) == {"decoder"}
  restored = ckpt.restore_state(state)
  assert int(restored.step) == 4
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                         state.params, restored.params)
  assert any(jax.tree.leaves(changed))
  # The run records which encoder its features came from.
  with open(os.path.join(cache_dir, "index.json")) as f:
    index = json.load(f)
  run = restore.restore_run(workdir)
  assert run.info == {"encoder_source": index["encoder_source"],
                      "encoder_fingerprint": index["encoder_fingerprint"]}
  jax.tree.map(np.testing.assert_array_equal, run.params, restored.params)

  # Captioning images needs an encoder, which a cached run does not have.
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="saved no image encoder"):
    caption.load_captioner(workdir)

  # An image run takes that decoder via init_from, and its encoder is
  # rebuilt from the run's record: the one the features came from.
  config.data_source = "tfds"
  config.init_from = workdir
  fresh = state_lib.create_train_state(jax.random.key(1), config, len(vocab))
  params, batch_stats = restore.initial_weights(
      config, fresh.params, fresh.batch_stats, run)
  jax.tree.map(np.testing.assert_array_equal, params["decoder"],
               restored.params["decoder"])
  assert pretrained.fingerprint(
      {"params": params["encoder"],
       "batch_stats": batch_stats}) == index["encoder_fingerprint"]
  assert pretrained.fingerprint(
      {"params": fresh.params["encoder"],
       "batch_stats": fresh.batch_stats}) != index["encoder_fingerprint"]

  # Pretrained weights that are another encoder: one sentence, no start.
  weights = str(tmp_path / "other.safetensors")
  pretrained.save_encoder(weights, restore.encoder_from_source(
      config, "random:seed=7"))
  config.model.pretrained_path = weights
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="not the ones the decoder of"):
    restore.initial_weights(config, fresh.params, fresh.batch_stats, run)
  config.model.pretrained_path = ""

  # A recorded encoder that no longer matches its fingerprint.
  run.info = dict(run.info, encoder_fingerprint="0" * 16)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="has changed since"):
    restore.initial_weights(config, fresh.params, fresh.batch_stats, run)


@pytest.mark.slow
@pytest.mark.parametrize("encoder_mult", [0.0, 1.0])
def test_encoder_learning_rate_multiplier(encoder_mult):
  config = tiny.get_config()
  config.lr_mults.encoder = encoder_mult
  config.warmup_steps = 0
  vocab_size = 20
  state = state_lib.create_train_state(jax.random.key(0), config, vocab_size)
  before = jax.device_get((state.params, state.batch_stats))
  p_train_step, _ = step_lib.compile_steps(config)
  batch = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]),
                       fake_batch(config, vocab_size, config.batch_size))
  for _ in range(2):
    state, metrics = p_train_step(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
  params, stats = jax.device_get((state.params, state.batch_stats))

  def differs(a, b):
    return any(jax.tree.leaves(jax.tree.map(
        lambda x, y: not np.array_equal(x, y), a, b)))

  assert differs(before[0]["decoder"], params["decoder"])
  if encoder_mult == 0:
    jax.tree.map(np.testing.assert_array_equal, before[0]["encoder"],
                 params["encoder"])
    jax.tree.map(np.testing.assert_array_equal, before[1], stats)
  else:
    assert differs(before[0]["encoder"], params["encoder"])


def test_cache_errors(cache_dir, tiny_data_dir, tmp_path):
  config = _config(tiny_data_dir, cache_dir)
  config.image_size = 64
  with pytest.raises(feature_cache.FeatureCacheError,
                     match=r"was made for .* at 32 px .* not .* at 64 px"):
    feature_cache.open_cache(config, "unused")
  config = _config(tiny_data_dir, cache_dir)
  config.model.resnet_size = "18"
  with pytest.raises(feature_cache.FeatureCacheError, match="ResNet-tiny"):
    feature_cache.open_cache(config, "unused")

  config = _config(tiny_data_dir, str(tmp_path / "empty"))
  with pytest.raises(feature_cache.FeatureCacheError,
                     match="No feature cache in"):
    feature_cache.open_cache(config, "unused")

  broken = str(tmp_path / "broken")
  shutil.copytree(cache_dir, broken)
  os.remove(os.path.join(broken, "test", "part-00000-of-00001.json"))
  config = _config(tiny_data_dir, broken)
  with pytest.raises(feature_cache.FeatureCacheError,
                     match="incomplete for split 'test'"):
    feature_cache.open_cache(config, "unused")

  config = _config(tiny_data_dir, str(tmp_path / "out"))
  config.extract_random_encoder = False
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="No encoder weights"):
    extraction.extract(config, str(tmp_path / "no_run"))

  config.data_source = "frozen"
  with pytest.raises(errors.ConfigError,
                     match="Unknown data_source 'frozen'"):
    sources.create(config, "unused")
