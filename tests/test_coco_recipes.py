"""The COCO recipes, rehearsed end to end at their real sizes without COCO.

`configs/coco.py`, `coco_cached.py` and `coco_finetune.py` run as a user
runs them (`python -m ...`, one CPU device, `:1`), unchanged but for the
dataset (`coco_rehearsal/tiny`: coco_captions/2014's features, COCO-sized
JPEGs) and a generated ResNet-101 weight file, for a few steps each: ResNet-101
at 224 px, 7x7x2048 features, bfloat16, evaluation with pycocoevalcap's
scorers (METEOR and the PTB tokenizer where Java is installed), checkpoints,
resume, feature extraction, fine-tuning from the cached run and the caption
CLI on a JPEG.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from visionspeak_jax.models import pretrained
from visionspeak_jax.models import resnet
from visionspeak_jax.run import restore

pytestmark = pytest.mark.slow

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few steps, every split's few images, a checkpoint and an evaluation at
# the end. The rest of each config is as shipped.
_FEW_STEPS = ("--config.dataset=coco_rehearsal/tiny",
              "--config.num_train_steps=2", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=2",
              "--config.eval_every_steps=2", "--config.eval_batch_size=8")
_SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  return env


def _run(module, config, workdir, *flags, timeout=900):
  """`python -m visionspeak_jax.MODULE`: (exit status, output)."""
  proc = subprocess.run(
      [sys.executable, "-m", f"visionspeak_jax.{module}", f"--config={config}",
       f"--workdir={workdir}", *flags], cwd=_ROOT, env=_env(),
      capture_output=True, text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir; the first run generates `coco_rehearsal/tiny` in it."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A ResNet-101 state dict in torchvision's naming, random weights."""
  path = str(tmp_path_factory.mktemp("weights") / "resnet101.safetensors")
  variables = jax.device_get(resnet.create("101").init(
      jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False))
  pretrained.save_encoder(path, variables)
  return path


@pytest.fixture(scope="module")
def coco_run(data_dir, weights, tmp_path_factory):
  """configs/coco.py:1 for two steps, then resumed for a third."""
  workdir = str(tmp_path_factory.mktemp("coco"))
  flags = (f"--config.data_dir={data_dir}",
           f"--config.model.pretrained_path={weights}", *_FEW_STEPS)
  status, output = _run("main", "configs/coco.py:1", workdir, *flags)
  assert status == 0, output[-3000:]
  first = _records(workdir)
  status, output = _run("main", "configs/coco.py:1", workdir, *flags,
                        "--config.num_train_steps=3")
  assert status == 0, output[-3000:]
  assert "Resuming from the checkpoint of step 2" in output
  return workdir, first, _records(workdir)[len(first):]


def test_coco_recipe_trains_evaluates_and_resumes(coco_run, weights):
  workdir, first, resumed = coco_run
  train = [r for r in first if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in train)
  for split in ("val", "test"):
    (record,) = [r for r in first if r["split"] == split]
    for score in _SCORES:
      assert score in record, (split, score)
    assert record["num_images"] == 8
    if shutil.which("java"):
      assert "meteor" in record
  assert [r["step"] for r in resumed if r["split"] == "train"] == [3]
  run = restore.restore_run(workdir)
  assert run.step == 3
  assert run.config.dtype == "bfloat16" and run.config.lr_mults.encoder == 0
  # The frozen encoder is still the weight file's.
  loaded = pretrained.load_encoder(weights, "101")
  np.testing.assert_array_equal(
      run.params["encoder"]["conv_init"]["kernel"],
      loaded["params"]["conv_init"]["kernel"])
  assert len(run.vocab) > 10  # words of the rehearsal captions


def test_caption_cli_on_a_coco_sized_jpeg(coco_run, tmp_path):
  workdir, _, _ = coco_run
  image = tmp_path / "photo.jpg"
  rng = np.random.RandomState(0)
  Image.fromarray(rng.randint(0, 256, (480, 640, 3), np.uint8)).save(
      image, quality=90)
  proc = subprocess.run(
      [sys.executable, "-m", "visionspeak_jax.tools.caption",
       f"--workdir={workdir}",
       "--beam_size=3", "--json", str(image)], cwd=_ROOT, env=_env(),
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = proc.stdout.splitlines()
  result = json.loads(line)
  assert result["image"] == str(image)
  assert isinstance(result["caption"], str)


def test_coco_recipe_without_weights_is_one_sentence(data_dir, tmp_path):
  status, output = _run("main", "configs/coco.py:1", str(tmp_path / "run"),
                        f"--config.data_dir={data_dir}", *_FEW_STEPS)
  assert status == 1
  last = output.strip().splitlines()[-1]
  assert "no weights were given" in last, output[-2000:]
  assert "--config.model.pretrained_path=FILE" in last
  assert "Traceback" not in output


def test_two_stage_recipes(coco_run, data_dir, weights, tmp_path):
  del coco_run  # Generated the data.
  features = str(tmp_path / "features")
  status, output = _run(
      "tools.extract_features", "configs/coco_cached.py:1", features,
      f"--config.data_dir={data_dir}", "--config.dataset=coco_rehearsal/tiny",
      f"--config.model.pretrained_path={weights}", "--config.batch_size=8",
      "--config.eval_batch_size=8")
  assert status == 0, output[-3000:]
  with open(os.path.join(features, "features", "index.json")) as f:
    index = json.load(f)
  assert (index["num_regions"], index["feature_dim"]) == (49, 2048)

  cached = str(tmp_path / "cached")
  status, output = _run(
      "main", "configs/coco_cached.py:1", cached, *_FEW_STEPS,
      f"--config.feature_cache_dir={features}/features")
  assert status == 0, output[-3000:]
  (test,) = [r for r in _records(cached) if r["split"] == "test"]
  assert all(score in test for score in _SCORES)

  # Fine-tuning from the cached run: its decoder, and the encoder that
  # extracted its features, rebuilt from the recorded weight file.
  finetuned = str(tmp_path / "finetune")
  status, output = _run(
      "main", "configs/coco_finetune.py:1", finetuned,
      f"--config.data_dir={data_dir}", f"--config.init_from={cached}",
      *_FEW_STEPS)
  assert status == 0, output[-3000:]
  start = restore.restore_run(cached)
  run = restore.restore_run(finetuned)
  loaded = pretrained.load_encoder(weights, "101")
  assert run.config.lr_mults.encoder > 0
  kernel = run.params["encoder"]["conv_init"]["kernel"]
  assert not np.array_equal(kernel, loaded["params"]["conv_init"]["kernel"])
  assert np.allclose(kernel, loaded["params"]["conv_init"]["kernel"],
                     atol=1e-3)  # Two steps at a low rate.
  assert run.vocab.words == start.vocab.words


def test_coco_recipe_at_14x14(coco_run, data_dir, weights, tmp_path):
  """configs/coco_14x14.py: 448 px through ResNet-101, 196 regions."""
  del coco_run  # Generated the data.
  workdir = str(tmp_path / "coco14")
  status, output = _run("main", "configs/coco_14x14.py:1", workdir,
                        f"--config.data_dir={data_dir}",
                        f"--config.model.pretrained_path={weights}",
                        *_FEW_STEPS)
  assert status == 0, output[-3000:]
  (test,) = [r for r in _records(workdir) if r["split"] == "test"]
  assert all(score in test for score in _SCORES)
  run = restore.restore_run(workdir)
  assert (run.config.image_size, run.config.model.grid) == (448, 14)
  from visionspeak_jax.tools import caption  # pylint: disable=g-import-not-at-top
  loaded = caption.load_captioner(workdir)
  (result,) = caption.caption_arrays(
      loaded, np.zeros((1, 448, 448, 3), np.uint8), beam_size=2,
      batch_size=1)
  assert result.alphas.shape == (len(result.words), 14, 14)


def test_self_critical_recipe_from_the_coco_run(coco_run, data_dir, weights,
                                                tmp_path):
  workdir, _, _ = coco_run
  scst = str(tmp_path / "scst")
  status, output = _run("main", "configs/coco_scst.py:1", scst,
                        f"--config.data_dir={data_dir}",
                        f"--config.model.pretrained_path={weights}",
                        f"--config.init_from={workdir}", *_FEW_STEPS)
  assert status == 0, output[-3000:]
  train = [r for r in _records(scst) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  assert restore.restore_run(scst).config.objective == "scst"
