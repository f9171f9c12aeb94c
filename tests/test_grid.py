"""The region grid (`config.model.grid`): adaptive average pooling of the
ResNet's map, and every consumer of the regions at a grid other than the map.

The tiny ResNet gives a 4x4 map at 32 px; a 3x3 grid pools it with
overlapping bins, so nothing here can pass by reading 16 regions.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax import train
from visionspeak_jax.models import captioner
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore
from visionspeak_jax.tools import caption
from visionspeak_jax.tools import evaluate
from visionspeak_jax.tools import extraction

_GRID = 3


def _config(data_dir, **fields):
  config = tiny.get_config()
  config.data_dir = data_dir
  config.model.grid = _GRID
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 2
  config.num_eval_examples = 8
  for key, value in fields.items():
    target = config
    *parents, leaf = key.split(".")
    for part in parents:
      target = target[part]
    target[leaf] = value
  return config


def _pool_1d(values, out):
  """`pool_to_grid` along one axis of a [1, n, 1, 1] map."""
  spatial = jnp.asarray(values, jnp.float32).reshape(1, -1, 1, 1)
  return np.asarray(captioner.pool_to_grid(spatial, (out, 1)))[0, :, 0, 0]


def test_pooling_bins_are_torchs_adaptive_ones():
  # Even bins: block means.
  np.testing.assert_allclose(_pool_1d([1, 3, 5, 7], 2), [2, 6])
  # 5 -> 3: bins [0, 2), [1, 4), [3, 5) overlap.
  np.testing.assert_allclose(_pool_1d([0, 1, 2, 3, 4], 3), [0.5, 2, 3.5])
  # sgrvinod's 256 px: an 8-cell side "pooled" to 14 repeats cells.
  np.testing.assert_allclose(
      _pool_1d(np.arange(8), 14),
      [0, .5, 1, 1.5, 2, 2.5, 3, 4, 4.5, 5, 5.5, 6, 6.5, 7])
  # Both axes at once, each with its own bins.
  spatial = jnp.arange(4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 1)
  pooled = captioner.pool_to_grid(spatial, (2, 3))
  expected = spatial.reshape(2, 2, 3, 2).mean(axis=(1, 3))
  np.testing.assert_allclose(pooled[0, :, :, 0], expected)


def test_a_grid_equal_to_the_map_is_the_map_itself():
  spatial = jax.random.normal(jax.random.key(0), (2, 7, 7, 5))
  assert captioner.pool_to_grid(spatial, (7, 7)) is spatial
  config = tiny.get_config()
  assert captioner.grid(config) == captioner.encoder_map(config) == (4, 4)
  config.model.grid = 4
  assert captioner.grid(config) == (4, 4)
  config.model.grid = _GRID
  assert captioner.grid(config) == (3, 3)
  assert captioner.num_regions(config) == 9


def test_a_grid_finer_than_the_map_is_refused_in_one_sentence():
  config = tiny.get_config()
  config.model.grid = 5
  with pytest.raises(errors.ConfigError) as e:
    config_checks.validate(config)
  message = str(e.value)
  assert "config.model.grid 5 is finer than the 4x4 map" in message
  assert "\n" not in message
  config.model.grid_upsample = True  # sgrvinod's way: repeat cells.
  config_checks.validate(config)
  config.model.grid = -1
  with pytest.raises(errors.ConfigError, match="config.model.grid must"):
    config_checks.validate(config)


def test_resume_refuses_another_grid():
  saved = tiny.get_config()
  config = tiny.get_config()
  config.model.grid = _GRID
  with pytest.raises(errors.ConfigError, match="model.grid=0 there, 3 now"):
    config_checks.check_resume(saved, config, "RUN")
  del saved.model["grid"]  # A run saved before the field existed...
  checkpoint_lib.complete_saved_config(saved)  # ... as it is read.
  with pytest.raises(errors.ConfigError, match="model.grid=0 there, 3 now"):
    config_checks.check_resume(saved, config, "RUN")


@pytest.fixture(scope="module")
def grid_run(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grid") / "run")
  train.train_and_evaluate(_config(tiny_data_dir), workdir)
  return workdir


def test_training_evaluation_and_captions_use_the_grid(grid_run,
                                                       tiny_data_dir,
                                                       tmp_path):
  run = restore.restore_run(grid_run)
  assert run.config.model.grid == _GRID
  report = evaluate.evaluate_run(grid_run, data_dir=tiny_data_dir,
                                 num_examples=4)
  # Grounding reads the attention maps on the 3x3 grid.
  assert 0.0 <= report["metrics"]["grounding"] <= 1.0
  loaded = caption.load_captioner(grid_run)
  assert loaded.grid == (3, 3)
  images = np.random.RandomState(0).randint(
      0, 256, (3, 32, 32, 3)).astype(np.uint8)
  results = caption.caption_arrays(loaded, images, beam_size=2, batch_size=2)
  for result in results:
    assert result.alphas.shape == (len(result.words), 3, 3)
  # The CLI's figures upsample the 3x3 maps onto the image.
  paths = []
  for i, image in enumerate(images):
    path = str(tmp_path / f"{i}.png")
    from PIL import Image  # pylint: disable=g-import-not-at-top
    Image.fromarray(image).save(path)
    paths.append(path)
  output = str(tmp_path / "figures")
  caption.run(paths, workdir=grid_run, beam_size=2, output=output)
  assert len(os.listdir(output)) == len(paths)


@pytest.mark.slow
def test_feature_cache_scst_and_hard_attention_use_the_grid(
    grid_run, tiny_data_dir, tmp_path):
  # Features extracted at the grid, and a decoder trained on them.
  cache = str(tmp_path / "cache")
  config = _config(tiny_data_dir, feature_cache_dir=cache,
                   extract_random_encoder=True)
  extraction.extract(config, str(tmp_path / "unused"))
  with open(os.path.join(cache, "index.json")) as f:
    assert json.load(f)["num_regions"] == 9
  config.data_source = "feature_cache"
  results = train.train_and_evaluate(config, str(tmp_path / "cached"))
  assert 0.0 <= results["grounding"] <= 1.0
  # Self-critical training from the grid run.
  config = _config(tiny_data_dir, objective="scst", init_from=grid_run,
                   warmup_steps=0)
  config.scst.num_samples = 3
  results = train.train_and_evaluate(config, str(tmp_path / "scst"))
  assert 0.0 <= results["cider"]
  # Hard attention samples one of the 9 regions; its maps are one-hot.
  config = _config(tiny_data_dir, alpha_c=0.0)
  config.model.attention = "hard"
  config.hard_attention.decoding = "hard"
  workdir = str(tmp_path / "hard")
  train.train_and_evaluate(config, workdir)
  loaded = caption.load_captioner(workdir)
  images = np.zeros((2, 32, 32, 3), np.uint8)
  for result in caption.caption_arrays(loaded, images, beam_size=1,
                                       batch_size=2):
    maps = result.alphas.reshape(len(result.words), 9)
    np.testing.assert_allclose(maps.max(axis=1), 1.0)
