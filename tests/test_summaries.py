"""TensorBoard summaries, read back with TensorBoard's own loader."""

import collections
import glob
import os
import shutil

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util

from configs import tiny
from visionspeak_jax import train
from visionspeak_jax.evaluation import evaluator
from visionspeak_jax.run import summaries
from visionspeak_jax.training import optimizer


def _load(workdir):
  """TensorBoard's view of WORKDIR/tensorboard, nothing sampled away."""
  acc = plugin_event_accumulator.EventAccumulator(
      os.path.join(workdir, summaries.SUBDIR),
      size_guidance={plugin_event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def _steps(acc, tag):
  return [e.step for e in acc.Tensors(tag)]


def _scalars(acc, tag):
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)}


def _all_steps(acc):
  """{tag: [step, ...]} over every tag in the log."""
  return {tag: _steps(acc, tag) for tag in acc.Tags()["tensors"]}


def test_resume_keeps_each_point_once(tmp_path):
  log = summaries.TensorBoardLog(str(tmp_path))
  log.resume(0)
  for step in range(1, 6):
    log.write({"step": step, "split": "train", "loss": float(step)})
  log.close()
  # Resumed from step 3: steps 4 and 5 are written again, differently.
  log = summaries.TensorBoardLog(str(tmp_path))
  log.resume(3)
  for step in (4, 5):
    log.write({"step": step, "split": "train", "loss": 10.0 * step})
  log.close()
  acc = _load(str(tmp_path))
  assert _scalars(acc, "train/loss") == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0,
                                         5: 50.0}
  assert _steps(acc, "train/loss") == [1, 2, 3, 4, 5]


def test_a_kill_during_resume_still_keeps_each_point_once(tmp_path):
  log = summaries.TensorBoardLog(str(tmp_path))
  log.resume(0)
  for step in (1, 2):
    log.write({"step": step, "split": "train", "loss": float(step)})
  log.close()
  logdir = os.path.join(str(tmp_path), summaries.SUBDIR)
  (old,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  shutil.copy(old, old + ".copy")  # As if the old file outlived its rewrite.
  os.rename(old + ".copy", old.replace("tfevents.", "tfevents.0", 1))
  log = summaries.TensorBoardLog(str(tmp_path))
  log.resume(2)
  log.close()
  assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1
  assert _steps(_load(str(tmp_path)), "train/loss") == [1, 2]


def test_disabled_log_writes_nothing(tmp_path):
  log = summaries.TensorBoardLog(str(tmp_path), enabled=False)
  log.resume(0)
  log.write({"step": 1, "split": "train", "loss": 1.0})
  log.close()
  assert not os.path.exists(os.path.join(str(tmp_path), summaries.SUBDIR))


@pytest.mark.slow
def test_training_writes_scalars_and_attention_images(tiny_data_dir,
                                                      tmp_path):
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  config.eval_every_steps = 3
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  acc = _load(workdir)
  tags = acc.Tags()["tensors"]
  scalars = set(acc.PluginTagToContent("scalars"))
  for name in ("loss", "xent", "attention_loss", "accuracy", "grad_norm",
               "learning_rate", "steps_per_sec"):
    assert f"train/{name}" in scalars, name
    assert _steps(acc, f"train/{name}") == [2, 4, 6], name
  for split, steps in (("validation", [3, 6]), ("test", [6])):
    for name in ("bleu4", "cider", "rouge_l", "content_f1", "grounding",
                 "num_images"):
      assert f"{split}/{name}" in scalars, (split, name)
      assert _steps(acc, f"{split}/{name}") == steps, (split, name)
  # The rate of the update that ended at each logged step.
  schedule = optimizer.learning_rate_schedule(config)
  lr = _scalars(acc, "train/learning_rate")
  assert lr == pytest.approx({s: float(schedule(s - 1)) for s in (2, 4, 6)})
  assert lr[6] < lr[4] and lr[2] > 0

  images = set(acc.PluginTagToContent("images"))
  expected = {f"validation/attention/{i}"
              for i in range(evaluator.NUM_FIGURES)}
  assert images == expected
  for tag in expected:
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [3, 6]
    # The images plugin's layout: width, height, then the encoded PNGs.
    width, height, png = tensor_util.make_ndarray(events[-1].tensor_proto)
    assert int(width) > 128 and int(height) > 128
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert "validation/caption/0" in tags

  # A kill after step 6's summaries but before its checkpoint: the run
  # resumes from step 3 and writes steps 4 to 6 again, each once.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  shutil.rmtree(os.path.join(workdir, "best", "6"), ignore_errors=True)
  before = _all_steps(acc)
  train.train_and_evaluate(config, workdir)
  after = _all_steps(_load(workdir))
  assert after == before
  for tag, steps in after.items():
    duplicated = [s for s, n in collections.Counter(steps).items() if n > 1]
    assert not duplicated, (tag, duplicated)
  assert np.isfinite(list(_scalars(_load(workdir), "train/loss").values())
                     ).all()
