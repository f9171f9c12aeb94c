"""Checkpoint readers leave a run's files alone and survive its saves."""

import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.text import vocabulary as vocab_lib

_VOCAB = vocab_lib.Vocabulary.build(["a red circle"])


def _save(ckpt, step):
  state = {"w": np.full((3,), float(step), np.float32)}
  ckpt.save(step, state, _VOCAB, tiny.get_config())
  ckpt.wait()


def _read(ckpt, step):
  return ckpt.restore_state({"w": np.zeros((3,), np.float32)}, step)


def test_a_reader_deletes_no_save_in_flight(tmp_path):
  directory = str(tmp_path / "checkpoints")
  writer = checkpoint_lib.Checkpointer(directory, write=True)
  _save(writer, 1)
  writer.close()
  # What a save in flight (or one cut short by a kill) looks like on disk.
  in_flight = os.path.join(directory, "2.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(in_flight, "state"))
  reader = checkpoint_lib.Checkpointer(directory)
  assert reader.latest_step() == 1
  assert _read(reader, 1)["w"][0] == 1.0
  with pytest.raises(RuntimeError, match="open for reading"):
    _save(reader, 3)
  reader.close()
  assert checkpoint_lib.has_checkpoint(directory)
  assert os.path.isdir(in_flight)
  assert sorted(os.listdir(directory)) == sorted(
      ["1", "2.orbax-checkpoint-tmp-1234567"])
  # The lock holder's writer clears it away (by its first save).
  writer = checkpoint_lib.Checkpointer(directory, write=True)
  _save(writer, 3)
  writer.close()
  assert sorted(os.listdir(directory)) == ["1", "3"]


def test_a_reader_creates_no_directory(tmp_path):
  directory = str(tmp_path / "nothing" / "checkpoints")
  assert not checkpoint_lib.has_checkpoint(directory)
  reader = checkpoint_lib.Checkpointer(directory)
  assert reader.latest_step() is None
  assert reader.restore_newest_intact(lambda step: step) is None
  reader.close()
  assert not os.path.exists(tmp_path / "nothing")


def test_a_step_deleted_while_read_is_not_damage(tmp_path):
  directory = str(tmp_path / "checkpoints")
  writer = checkpoint_lib.Checkpointer(directory, write=True, max_to_keep=2)
  _save(writer, 1)
  _save(writer, 2)
  reader = checkpoint_lib.Checkpointer(directory)
  calls = []

  def restore(step):
    calls.append(step)
    if len(calls) == 1:
      # Meanwhile the trainer saves steps 3 and 4 and deletes 1 and 2 (it
      # keeps two), under a reader that had listed [1, 2].
      _save(writer, 3)
      _save(writer, 4)
      assert sorted(os.listdir(directory)) == ["3", "4"]
    return _read(reader, step)["w"][0]

  assert reader.restore_newest_intact(restore) == (4, 4.0)
  assert calls == [2, 4]
  writer.close()
  reader.close()


def test_damage_is_still_damage(tmp_path):
  directory = str(tmp_path / "checkpoints")
  writer = checkpoint_lib.Checkpointer(directory, write=True)
  _save(writer, 1)
  _save(writer, 2)
  writer.close()
  shutil.rmtree(os.path.join(directory, "2", "state"))
  reader = checkpoint_lib.Checkpointer(directory)
  assert reader.restore_newest_intact(lambda s: _read(reader, s)["w"][0]) == (
      1, 1.0)
  shutil.rmtree(os.path.join(directory, "1", "state"))
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"No intact checkpoint .* \(steps 1, 2 are all "
                     r"damaged; step 2: "):
    reader.restore_newest_intact(lambda s: _read(reader, s))
  reader.close()


def test_a_saved_config_is_completed_with_the_fields_added_since():
  """Every field added after a run was saved reads as that run used it."""
  old = tiny.get_config().to_dict()
  for name in ("captions_per_image", "grad_clip_value", "suppress_unk",
               "block_trigrams", "min_length", "metrics_protocol"):
    del old[name]
  del old["model"]["grid"], old["model"]["grid_upsample"]
  del old["hard_attention"]["decoding"]
  old["metrics_use_java"] = False
  config = checkpoint_lib.complete_saved_config(ml_collections.ConfigDict(old))
  assert (config.model.grid, config.model.grid_upsample) == (0, False)
  assert (config.captions_per_image, config.grad_clip_value) == (1, 0.0)
  assert (config.suppress_unk, config.block_trigrams,
          config.min_length) == (False, False, 0)
  assert config.hard_attention.decoding == "hard"
  assert config.metrics_protocol == "regex-tokens"
  # A field the run saved is kept as it was.
  current = tiny.get_config()
  current.model.grid = 3
  assert checkpoint_lib.complete_saved_config(
      ml_collections.ConfigDict(current.to_dict())).to_dict() == (
          current.to_dict())
