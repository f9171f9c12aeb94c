"""Feature caches, "cached" decoder training and "fine_tune" (two fake CPUs)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax import caption
from visionspeak_jax import checkpoint as checkpoint_lib
from visionspeak_jax import features
from visionspeak_jax import pretrained
from visionspeak_jax import train


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
  return features.extract(config, str(root / "unused_workdir"))


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
  cache = features.open_cache(_config(tiny_data_dir, cache_dir), "unused")
  examples = list(cache.eval_examples("validation", 3))
  assert examples[0].image.shape == (16, 32)
  assert examples[0].image.dtype == np.float16
  assert len(examples[0].references) == 5 and examples[0].objects
  assert isinstance(examples[0].objects[0]["bbox"], tuple)


def test_cached_training_is_decoder_only_and_checkpoints(cache_dir,
                                                         tmp_path):
  # No TFDS data at all: captions, features and objects come from the cache.
  config = _config(str(tmp_path / "no_tfds"), cache_dir)
  config.encoder_mode = "cached"
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  config.num_eval_examples = 8
  workdir = str(tmp_path / "cached")
  results = train.train_and_evaluate(config, workdir)
  assert results["num_images"] == 8 and 0.0 <= results["cider"] <= 10.0
  assert "content_f1" in results and "grounding" in results
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() == 4
  vocab, _ = ckpt.restore_metadata()
  state = train.create_train_state(jax.random.key(0), config, len(vocab))
  assert set(state.params) == {"decoder"}
  restored = ckpt.restore_state(state)
  assert int(restored.step) == 4
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                         state.params, restored.params)
  assert any(jax.tree.leaves(changed))

  # Captioning images needs an encoder, which a cached run does not have.
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="saved no image encoder"):
    caption.load_captioner(workdir)

  # A fine_tune state takes that decoder via init_from, and its encoder is
  # rebuilt from the cache's record: the one the features came from.
  config.encoder_mode = "fine_tune"
  config.init_from = workdir
  fresh = train.create_train_state(jax.random.key(1), config, len(vocab))
  started = train.init_from_checkpoint(fresh, config)
  jax.tree.map(np.testing.assert_array_equal, started.params["decoder"],
               restored.params["decoder"])
  with open(os.path.join(cache_dir, "index.json")) as f:
    index = json.load(f)
  assert pretrained.fingerprint(
      {"params": started.params["encoder"],
       "batch_stats": started.batch_stats}) == index["encoder_fingerprint"]
  assert pretrained.fingerprint(
      {"params": fresh.params["encoder"],
       "batch_stats": fresh.batch_stats}) != index["encoder_fingerprint"]

  # Pretrained weights that are another encoder: one sentence, no start.
  config.model.pretrained_path = "/weights/other.safetensors"
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="not the ones the decoder of"):
    train.init_from_checkpoint(fresh, config)
  config.model.pretrained_path = ""

  # A recorded encoder that no longer matches its fingerprint.
  changed = str(tmp_path / "changed_cache")
  shutil.copytree(cache_dir, changed)
  index["encoder_fingerprint"] = "0" * 16
  with open(os.path.join(changed, "index.json"), "w") as f:
    json.dump(index, f)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  saved = ckpt.restore_metadata()[1]
  ckpt.close()
  saved.feature_cache_dir = changed
  with pytest.raises(features.FeatureCacheError, match="has changed since"):
    features.extraction_encoder(saved, workdir,
                                features.cache_index(saved, workdir))


def _batch(config, vocab_size, batch_size, seed=0):
  rng = np.random.RandomState(seed)
  size, length = config.image_size, config.max_caption_length + 2
  tokens = rng.randint(4, vocab_size, (batch_size, length)).astype(np.int32)
  tokens[:, 0] = 1
  tokens[:, length // 2] = 2
  tokens[:, length // 2 + 1:] = 0
  return {"image": rng.randint(0, 256, (batch_size, size, size, 3))
                   .astype(np.uint8), "tokens": tokens}


@pytest.mark.parametrize("encoder_lr", [0.0, 1e-3])
def test_fine_tune_encoder_learning_rate(encoder_lr):
  config = tiny.get_config()
  config.encoder_mode = "fine_tune"
  config.encoder_learning_rate = encoder_lr
  config.warmup_steps = 0
  vocab_size = 20
  state = train.create_train_state(jax.random.key(0), config, vocab_size)
  before = jax.device_get((state.params, state.batch_stats))
  p_train_step, _ = train.compile_steps(config)
  batch = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]),
                       _batch(config, vocab_size, config.batch_size))
  for _ in range(2):
    state, metrics = p_train_step(state, batch, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
  params, stats = jax.device_get((state.params, state.batch_stats))

  def differs(a, b):
    return any(jax.tree.leaves(jax.tree.map(
        lambda x, y: not np.array_equal(x, y), a, b)))

  assert differs(before[0]["decoder"], params["decoder"])
  if encoder_lr == 0:
    jax.tree.map(np.testing.assert_array_equal, before[0]["encoder"],
                 params["encoder"])
    jax.tree.map(np.testing.assert_array_equal, before[1], stats)
  else:
    assert differs(before[0]["encoder"], params["encoder"])


def test_cache_errors(cache_dir, tiny_data_dir, tmp_path):
  config = _config(tiny_data_dir, cache_dir)
  config.image_size = 64
  with pytest.raises(features.FeatureCacheError,
                     match=r"was made for .* at 32 px .* not .* at 64 px"):
    features.open_cache(config, "unused")
  config = _config(tiny_data_dir, cache_dir)
  config.model.resnet_size = "18"
  with pytest.raises(features.FeatureCacheError, match="ResNet-tiny"):
    features.open_cache(config, "unused")

  config = _config(tiny_data_dir, str(tmp_path / "empty"))
  with pytest.raises(features.FeatureCacheError, match="No feature cache in"):
    features.open_cache(config, "unused")

  broken = str(tmp_path / "broken")
  shutil.copytree(cache_dir, broken)
  os.remove(os.path.join(broken, "test", "part-00000-of-00001.json"))
  config = _config(tiny_data_dir, broken)
  with pytest.raises(features.FeatureCacheError,
                     match="incomplete for split 'test'"):
    features.open_cache(config, "unused")

  config = _config(tiny_data_dir, str(tmp_path / "out"))
  config.extract_random_encoder = False
  with pytest.raises(features.FeatureCacheError, match="No encoder weights"):
    features.extract(config, str(tmp_path / "no_run"))

  config.encoder_mode = "frozen"
  with pytest.raises(ValueError, match="Unknown encoder_mode 'frozen'"):
    train.create_train_state(jax.random.key(0), config, 10)
