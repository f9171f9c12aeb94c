"""Caption CLI and figure tests, on a tiny run trained once for the module.

The run's TFDS data is deleted right after training, so every test here also
checks that captioning needs nothing but the checkpoint.
"""

import io
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from visionspeak_jax import errors
from visionspeak_jax.data import images as images_lib
from visionspeak_jax.models import decoding
from visionspeak_jax.run import figures
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.tools import caption

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """A workdir trained for two steps, whose dataset no longer exists."""
  return tiny_run


@pytest.fixture(scope="module")
def captioner(run_dir):
  return caption.load_captioner(run_dir)


def _rgb(h, w, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(
      np.uint8)


def _write_inputs(d):
  """Good and bad image files: {name: (path, ok)} in a fixed order."""
  rgb = _rgb(48, 64)
  files = {}

  def add(name, ok, save=None, data=None):
    path = os.path.join(d, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if save is not None:
      save(path)
    elif data is not None:
      with open(path, "wb") as f:
        f.write(data)
    files[name] = (path, ok)

  add("rgb.png", True, lambda p: Image.fromarray(rgb).save(p))
  add("rgb.jpg", True, lambda p: Image.fromarray(rgb).save(p, quality=90))
  add("gray.png", True, lambda p: Image.fromarray(rgb).convert("L").save(p))
  add("bilevel.png", True, lambda p: Image.fromarray(rgb).convert("1").save(p))
  add("palette.png", True,
      lambda p: Image.fromarray(rgb).convert("P").save(p))
  add("palette_alpha.png", True,
      lambda p: Image.fromarray(rgb).convert("P").save(p, transparency=0))
  add("rgba.png", True, lambda p: Image.fromarray(rgb).convert("RGBA").save(p))
  add("la.png", True, lambda p: Image.fromarray(rgb).convert("LA").save(p))
  add("cmyk.jpg", True, lambda p: Image.fromarray(rgb).convert("CMYK").save(p))
  add("gray16.png", True, lambda p: Image.fromarray(
      np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)).save(p))
  add("tiny.png", True,
      lambda p: Image.new("RGB", (1, 1), (9, 99, 199)).save(p))
  add("big.jpg", True,
      lambda p: Image.new("RGB", (10000, 10000), (20, 90, 200)).save(p))

  def rotated(p):
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view.
    image.save(p, exif=exif)

  add("rotated.png", True, rotated)
  add("a/same.png", True, lambda p: Image.fromarray(rgb).save(p))
  add("b/same.png", True, lambda p: Image.fromarray(rgb).save(p))
  with open(files["rgb.png"][0], "rb") as f:
    png = f.read()
  with open(files["rgb.jpg"][0], "rb") as f:
    jpg = f.read()
  add("truncated.png", False, data=png[:len(png) // 2])
  add("truncated.jpg", False, data=jpg[:len(jpg) // 2])
  add("text.jpg", False, data=b"this is not an image\n")
  add("empty.png", False, data=b"")
  # A header of 20000 x 20000 pixels: refused before decoding.
  add("bomb.png", False, lambda p: Image.new("1", (20000, 20000)).save(p))
  os.makedirs(os.path.join(d, "folder.png"))
  files["folder.png"] = (os.path.join(d, "folder.png"), False)
  files["missing.png"] = (os.path.join(d, "missing.png"), False)
  return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  return _write_inputs(str(tmp_path_factory.mktemp("images")))


def test_cli_captions_good_files_and_reports_bad_ones(run_dir, inputs,
                                                      tmp_path):
  output = str(tmp_path / "figures")
  paths = [path for path, _ in inputs.values()]
  # As a user runs it: without the test session's TensorFlow log level.
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  # Greedy and a batch smaller than the file count: several padded batches.
  proc = subprocess.run(
      [sys.executable, "-m", "visionspeak_jax.tools.caption",
       f"--workdir={run_dir}",
       "--beam_size=1", "--batch_size=4", f"--output={output}"] + paths,
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 1, proc.stderr
  good = [p for p, ok in inputs.values() if ok]
  bad = [p for p, ok in inputs.values() if not ok]
  lines = proc.stdout.splitlines()
  assert [line.split(": ", 1)[0] for line in lines] == good
  vocab = vocab_lib.Vocabulary.load(os.path.join(run_dir, "vocab.json"))
  for line in lines:
    assert all(w in vocab.words for w in line.split(": ", 1)[1].split())
  # Exactly one line per bad file, naming it: no traceback, no log noise.
  errors = proc.stderr.splitlines()
  assert [line.split(": error: ", 1)[0] for line in errors] == bad, (
      proc.stderr)
  assert all(line.endswith(".") and line.count(". ") == 0 for line in errors)
  # One figure per captioned image; the two same.png do not overwrite.
  written = sorted(os.listdir(output))
  assert len(written) == len(good)
  assert "same.png" in written and "same-1.png" in written
  for name in written:
    with Image.open(os.path.join(output, name)) as image:
      assert image.format == "PNG" and image.width >= 224


@pytest.mark.parametrize("name, reason", [
    ("missing.png", "no such file"),
    ("folder.png", "directory"),
    ("empty.png", "empty"),
    ("text.jpg", "not an image"),
    ("truncated.png", "truncated or corrupt"),
    ("truncated.jpg", "truncated or corrupt"),
    ("bomb.png", "too many pixels"),
])
def test_bad_image_is_one_sentence_naming_the_file(inputs, name, reason):
  path = inputs[name][0]
  with pytest.raises(images_lib.ImageError) as info:
    images_lib.load_image(path, 32)
  message = str(info.value)
  assert path in message and reason in message
  assert "\n" not in message and message.endswith(".")
  assert message.count(". ") == 0


def test_load_image_modes(inputs):
  def load(name):
    image = images_lib.load_image(inputs[name][0], 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    return image

  for name, (_, ok) in inputs.items():
    if ok:
      load(name)
  # 16-bit grey is scaled to 0..255, not clipped (which would be all white).
  assert 100 < load("gray16.png").mean() < 155
  assert (load("tiny.png") == (9, 99, 199)).all()
  # Transparent pixels are composited on white.
  clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
  path = os.path.join(os.path.dirname(inputs["rgb.png"][0]), "clear.png")
  clear.save(path)
  assert (images_lib.load_image(path, 32) == 255).all()
  # EXIF orientation is applied: the stored image is the view rotated.
  upright = np.rot90(_rgb(48, 64), k=-1)  # 90 degrees clockwise.
  path = os.path.join(os.path.dirname(inputs["rgb.png"][0]), "upright.png")
  Image.fromarray(np.ascontiguousarray(upright)).save(path)
  np.testing.assert_array_equal(load("rotated.png"),
                                images_lib.load_image(path, 32))


def test_load_image_matches_training_preprocessing(inputs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.data import input_pipeline
  for name in ("rgb.png", "rgb.jpg"):
    path = inputs[name][0]
    # The TFDS image feature decodes with tf.io.decode_image.
    decoded = tf.io.decode_image(tf.io.read_file(path), channels=3)
    expected = input_pipeline.resize_image(decoded, 32).numpy()
    got = images_lib.load_image(path, 32)
    if name.endswith(".png"):
      np.testing.assert_array_equal(got, expected)
    else:  # Two JPEG decoders may round differently.
      assert np.abs(got.astype(int) - expected).max() <= 2


def test_huge_png_is_fast(tmp_path):
  path = str(tmp_path / "huge.png")
  Image.new("RGB", (10000, 10000), (10, 200, 30)).save(path, compress_level=1)
  start = time.time()
  image = images_lib.load_image(path, 32)
  assert time.time() - start < 30
  assert (image == (10, 200, 30)).all()


def test_restore_needs_only_the_checkpoint(run_dir, captioner):
  assert not os.path.exists(captioner.config.data_dir)
  assert captioner.step == 2
  assert captioner.vocab == vocab_lib.Vocabulary.load(
      os.path.join(run_dir, "vocab.json"))
  h, w = captioner.grid
  assert h * w > 1
  best = caption.load_captioner(run_dir, best=True)
  assert best.step == 2 and best.vocab == captioner.vocab


def test_caption_arrays_pads_and_compiles_once(captioner):
  images = np.stack([_rgb(32, 32, seed) for seed in range(5)])
  results = caption.caption_arrays(captioner, images, beam_size=1,
                                   batch_size=4, max_length=6)
  assert len(results) == 5
  for result in results:
    assert len(result.words) <= 6
    assert result.alphas.shape == (len(result.words),) + captioner.grid
    assert np.isfinite(result.score)
    assert np.allclose(result.alphas.sum(axis=(1, 2)), 1.0, atol=1e-4)
  # The last, short batch was padded: one compiled shape.
  assert captioner.compiled(1, 6, 0.0)._cache_size() == 1
  # Images are captioned independently of their batch mates.
  alone = caption.caption_arrays(captioner, images[4:], beam_size=1,
                                 batch_size=4, max_length=6)
  assert alone[0].words == results[4].words


@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_sizes(captioner, beam_size):
  images = np.stack([_rgb(32, 32, seed) for seed in range(2)])
  results = caption.caption_arrays(captioner, images, beam_size=beam_size,
                                   batch_size=2, max_length=5)
  assert len(results) == 2
  for result in results:
    assert result.alphas.shape == (len(result.words),) + captioner.grid


def test_run_json_and_exit_status(run_dir, inputs, tmp_path):
  paths = [inputs["rgb.png"][0], inputs["gray.png"][0]]
  out, err = io.StringIO(), io.StringIO()
  output = str(tmp_path / "figs")
  status = caption.run(paths, workdir=run_dir, beam_size=1, as_json=True,
                       output=output, stdout=out, stderr=err)
  assert status == 0 and not err.getvalue()
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  assert [r["image"] for r in records] == paths
  for r in records:
    assert r["caption"] == " ".join(r["words"])
    assert isinstance(r["score"], float)
    assert os.path.getsize(r["figure"]) > 0


@pytest.mark.parametrize("kind", ["missing", "empty", "empty_checkpoints"])
def test_no_checkpoint_is_one_sentence_and_status_2(inputs, tmp_path, kind):
  workdir = tmp_path / "run"
  if kind != "missing":
    workdir.mkdir()
  if kind == "empty_checkpoints":
    (workdir / "checkpoints").mkdir()
  out, err = io.StringIO(), io.StringIO()
  status = caption.run([inputs["rgb.png"][0]], workdir=str(workdir),
                       beam_size=1, stdout=out, stderr=err)
  assert status == 2 and not out.getvalue()
  (line,) = err.getvalue().splitlines()
  assert "No checkpoint in" in line and str(workdir) in line
  assert line.endswith(".")
  # A mistyped --workdir is not created as a side effect.
  assert os.path.exists(workdir) == (kind != "missing")


def test_figure_panels_grow_with_words(tmp_path):
  image = _rgb(32, 32)
  sizes = []
  for num_words in (2, 4, 9):
    path = str(tmp_path / f"{num_words}.png")
    alphas = np.random.RandomState(num_words).rand(num_words, 3, 3)
    panels = figures.attention_figure(image, ["word"] * num_words, alphas,
                                      path)
    assert panels == num_words + 1
    with Image.open(path) as written:
      sizes.append(written.size)
  assert figures.grid_shape(3) == (1, 3) and figures.grid_shape(10) == (2, 5)
  assert sizes[0][0] < sizes[1][0]  # Wider while one row.
  assert sizes[1][1] < sizes[2][1]  # Then a second row.
  with pytest.raises(ValueError, match="attention maps"):
    figures.attention_figure(image, ["a", "b"], np.zeros((3, 3, 3)),
                             str(tmp_path / "bad.png"))


def test_bfloat16_decoding(captioner, run_dir, inputs):
  images = np.stack([_rgb(32, 32, seed) for seed in range(2)])
  results = caption.caption_arrays(captioner, images, beam_size=3,
                                   batch_size=2, max_length=5,
                                   decode_dtype="bfloat16")
  assert len(results) == 2
  for result in results:
    assert result.alphas.shape == (len(result.words),) + captioner.grid
    assert np.isfinite(result.score)
  with pytest.raises(errors.ConfigError, match="decode_dtype must be one of"):
    caption.caption_arrays(captioner, images, beam_size=1, batch_size=2,
                           decode_dtype="float16")
  out = io.StringIO()
  assert caption.run([inputs["rgb.png"][0]], workdir=run_dir, beam_size=2,
                     decode_dtype="bfloat16", stdout=out,
                     stderr=io.StringIO()) == 0
  assert out.getvalue().startswith(inputs["rgb.png"][0] + ": ")


def _has_repeated_trigram(words):
  trigrams = list(zip(words, words[1:], words[2:]))
  return len(set(trigrams)) < len(trigrams)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_constraints_reach_the_compiled_predict(captioner,
                                                         beam_size):
  images = np.stack([_rgb(32, 32, seed) for seed in range(4)])
  rules = dict(suppress_unk=True, block_trigrams=True, min_length=6)
  # The run's config asks for no rule.
  assert captioner.constraints() == decoding.Constraints()
  wanted = decoding.Constraints(suppress_ids=(vocab_lib.UNK_ID,),
                                min_length=6, block_trigrams=True)
  assert captioner.constraints(**rules) == wanted
  weights = captioner.decoding_weights("float32")
  plain, ruled = (
      jax.device_get(captioner.compiled(beam_size, 8, 0.0, constraints)(
          captioner.params, captioner.batch_stats, weights,
          {"image": images}))
      for constraints in (decoding.Constraints(), wanted))
  assert (np.asarray(ruled.lengths) >= 6).all()
  assert not (np.asarray(ruled.tokens) == vocab_lib.UNK_ID).any()
  for row in np.asarray(ruled.tokens):
    ids = list(row)
    ids = ids[:ids.index(vocab_lib.EOS_ID)] if vocab_lib.EOS_ID in ids else ids
    assert not _has_repeated_trigram(ids), row
  # The rules bind on this barely trained model.
  assert (np.asarray(ruled.tokens) != np.asarray(plain.tokens)).any()
  # caption_arrays runs the same compiled function, once per setting.
  results = caption.caption_arrays(captioner, images, beam_size=beam_size,
                                   batch_size=4, max_length=8, **rules)
  assert [r.words for r in results] == [captioner.vocab.decode(row)
                                        for row in ruled.tokens]
  assert captioner.compiled(beam_size, 8, 0.0, wanted)._cache_size() == 1
  assert captioner.compiled(beam_size, 8, 0.0)._cache_size() == 1


def test_run_passes_the_decoding_options(run_dir, inputs, monkeypatch):
  seen = []

  def recording(*args, **kwargs):
    seen.append({k: kwargs[k] for k in ("suppress_unk", "block_trigrams",
                                        "min_length")})
    return real(*args, **kwargs)

  real = caption.caption_arrays
  monkeypatch.setattr(caption, "caption_arrays", recording)
  out = io.StringIO()
  assert caption.run([inputs["rgb.png"][0]], workdir=run_dir, beam_size=1,
                     max_length=8, suppress_unk=True, block_trigrams=False,
                     min_length=6, stdout=out, stderr=io.StringIO()) == 0
  assert seen == [dict(suppress_unk=True, block_trigrams=False,
                       min_length=6)]
  assert out.getvalue().startswith(inputs["rgb.png"][0] + ": ")
