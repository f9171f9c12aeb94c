"""The exported captioner: both artifacts equal `tools.caption`, without us.

A tiny run is exported once per module (float32 and bfloat16 decoding). Each
artifact is then loaded in a fresh Python process that imports nothing of
this package (the process checks that itself) and captions shapes images at
batch sizes 1, 3 and 64 from the one artifact; its tokens and attention maps
must equal `caption.caption_arrays` on the same checkpoint and pixels.
"""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from visionspeak_jax.data import images as images_lib
from visionspeak_jax.data.datasets import shapes
from visionspeak_jax.tools import caption
from visionspeak_jax.tools import export

_BATCHES = (1, 3, 64)

# Runs in a fresh process: only jax and numpy. Argument: a JSON job.
_JAX_CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    job = json.loads(sys.argv[1])
    with open(job["module"], "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    pixels = np.load(job["pixels"])
    outputs = {}
    for b in job["batches"]:
      out = jax.device_get(exported.call(pixels[:b]))
      for name, value in out.items():
        outputs[f"{b}/{name}"] = np.asarray(value)
    np.savez(job["output"], **outputs)
    assert not [m for m in sys.modules if m.startswith("visionspeak_jax")]
    print("ok", len(outputs))
""")

# Runs in a fresh process: only TensorFlow and numpy. Argument: a JSON job.
_TF_CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    job = json.loads(sys.argv[1])
    model = tf.saved_model.load(job["saved_model"])
    serve = model.signatures["serving_default"]
    preprocess = model.signatures["preprocess"]
    files = []
    for path in job["files"]:
      with open(path, "rb") as f:
        files.append(f.read())
    outputs = {"pixels": preprocess(images=tf.constant(files))["pixels"]
               .numpy()}
    for b in job["batches"]:
      out = serve(images=tf.constant(files[:b]))
      for name, value in out.items():
        value = value.numpy()
        if value.dtype == object:  # Strings: npz keeps text, not bytes.
          value = np.array([v.decode("utf-8") for v in value])
        outputs[f"{b}/{name}"] = value
    errors = []
    for bad in (b"not an image", b"", files[0][:40]):
      try:
        serve(images=tf.constant([files[0], bad]))
        errors.append("no error")
      except tf.errors.InvalidArgumentError as e:
        errors.append(e.message)
    # The model still answers after the bad inputs.
    serve(images=tf.constant(files[:2]))
    np.savez(job["output"], **outputs)
    with open(job["output"] + ".errors.json", "w") as f:
      json.dump(errors, f)
    assert not [m for m in sys.modules if m.startswith("visionspeak_jax")]
    print("ok", len(outputs))
""")


def _child(script, job, tmp_path):
  """Runs a child script with a JSON job; returns its npz outputs."""
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)  # Nothing of the repository on the path...
  proc = subprocess.run([sys.executable, "-c", script, json.dumps(job)],
                        cwd=str(tmp_path), env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(job["output"]))


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory):
  """64 shapes images as files, PNG and JPEG alternating, and their pixels."""
  d = tmp_path_factory.mktemp("shapes_images")
  rng = np.random.default_rng(7)
  paths = []
  for i in range(max(_BATCHES)):
    image = shapes.generate_example(rng, i)["image"]
    path = str(d / (f"{i:02d}.png" if i % 2 == 0 else f"{i:02d}.jpg"))
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths


class _Exports(dict):
  """{decode_dtype: export directory} of the tiny run, made when first read."""

  def __init__(self, run, root):
    super().__init__()
    self.run, self.root = run, root

  def __missing__(self, dtype):
    self[dtype] = str(self.root / dtype)
    export.export(self.run, self[dtype], decode_dtype=dtype,
                  platforms=("cpu",))
    return self[dtype]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
  return _Exports(tiny_run, tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="module")
def model(tiny_run):
  return caption.load_captioner(tiny_run)


def _reference(model, pixels, batch, decode_dtype):
  """`caption_arrays` on the first `batch` images, batch at a time."""
  return caption.caption_arrays(model, pixels[:batch], beam_size=
                                model.config.beam_size, batch_size=batch,
                                decode_dtype=decode_dtype)


def _pixels(model, paths):
  return np.stack([images_lib.load_image(p, model.image_size)
                   for p in paths])


def test_manifest_and_files(exported, model):
  d = exported["float32"]
  assert sorted(os.listdir(d)) == ["captioner.jax", "manifest.json",
                                   "saved_model", "vocab.json"]
  with open(os.path.join(d, "manifest.json")) as f:
    info = json.load(f)
  assert info["input"]["image_size"] == model.image_size
  assert info["grid"] == list(model.grid)
  assert info["decoding"]["beam_size"] == model.config.beam_size
  assert info["decoding"]["max_length"] == model.config.max_decode_length
  assert info["decoding"]["decode_dtype"] == "float32"
  assert info["run"]["step"] == model.step
  assert info["module"]["platforms"] == ["cpu"]
  with open(os.path.join(d, "vocab.json")) as f:
    assert json.load(f)["words"] == model.vocab.words


@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_jax_module_equals_caption_tool(exported, model, shapes_files,
                                        tmp_path, dtype):
  pixels = _pixels(model, shapes_files)
  np.save(tmp_path / "pixels.npy", pixels)
  out = _child(_JAX_CHILD, {
      "module": os.path.join(exported[dtype], "captioner.jax"),
      "pixels": str(tmp_path / "pixels.npy"), "batches": list(_BATCHES),
      "output": str(tmp_path / "out.npz")}, tmp_path)
  h, w = model.grid
  for b in _BATCHES:
    want = _reference(model, pixels, b, dtype)
    tokens = out[f"{b}/tokens"]
    assert tokens.shape == (b, model.config.max_decode_length)
    assert out[f"{b}/attention"].shape == tokens.shape + (h, w)
    for i, c in enumerate(want):
      words, positions = model.vocab.decode_with_positions(tokens[i])
      assert words == c.words, (b, i)
      assert out[f"{b}/lengths"][i] == len(words)
      if dtype == "float32":
        np.testing.assert_allclose(out[f"{b}/attention"][i][positions],
                                   c.alphas, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out[f"{b}/scores"][i], c.score,
                                   atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_saved_model_equals_caption_tool(exported, model, shapes_files,
                                         tmp_path, dtype):
  out = _child(_TF_CHILD, {
      "saved_model": os.path.join(exported[dtype], "saved_model"),
      "files": shapes_files, "batches": list(_BATCHES),
      "output": str(tmp_path / "out.npz")}, tmp_path)
  pixels = _pixels(model, shapes_files)
  # The graph decodes and resizes PNG and JPEG files to the very pixels
  # that `data/images.py` gives.
  np.testing.assert_array_equal(out["pixels"], pixels)
  for b in _BATCHES:
    want = _reference(model, pixels, b, dtype)
    captions = list(out[f"{b}/captions"])
    assert captions == [c.text for c in want], b
    if dtype == "float32":
      for i, c in enumerate(want):
        _, positions = model.vocab.decode_with_positions(
            out[f"{b}/tokens"][i])
        np.testing.assert_allclose(out[f"{b}/attention"][i][positions],
                                   c.alphas, atol=1e-5, rtol=0)
  with open(str(tmp_path / "out.npz") + ".errors.json") as f:
    errors = json.load(f)
  # TensorFlow wraps the op's sentence in its graph error.
  assert "Unknown image file format" in errors[0], errors
  assert "An input is an empty string, not an encoded image." in errors[1], (
      errors)
  assert errors[2] != "no error", errors


def _encoded(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def test_saved_model_pixels_match_load_image_per_mode(exported, tmp_path):
  """Every kind of file: exact, or as far apart as docs/export.md says."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  preprocess = tf.saved_model.load(os.path.join(
      exported["float32"], "saved_model")).signatures["preprocess"]
  rgb = np.random.RandomState(0).randint(0, 256, (48, 64, 3)).astype(np.uint8)
  alpha = np.random.RandomState(1).randint(0, 256, (48, 64)).astype(np.uint8)
  base = Image.fromarray(rgb)
  cases = {  # name: (bytes, largest difference allowed)
      "rgb.png": (_encoded(base, "PNG"), 0),
      "rgb.jpg": (_encoded(base, "JPEG", quality=90), 0),
      "grey.png": (_encoded(base.convert("L"), "PNG"), 0),
      "grey.jpg": (_encoded(base.convert("L"), "JPEG"), 0),
      "palette.png": (_encoded(base.convert("P"), "PNG"), 0),
      "rgba.png": (_encoded(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
                   1),
      "la.png": (_encoded(Image.fromarray(np.dstack(
          [rgb[..., 0], alpha])), "PNG"), 1),
      "palette.gif": (_encoded(base.convert("P"), "GIF"), 0),
      "rgb.bmp": (_encoded(base, "BMP"), 0),
      "rgb.webp": (_encoded(base, "WEBP", lossless=True), 0),
      "grey16.png": (_encoded(Image.fromarray(np.linspace(
          0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)), "PNG"), 1),
      "cmyk.jpg": (_encoded(base.convert("CMYK"), "JPEG"), 2),
  }
  for name, (data, tolerance) in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    want = images_lib.load_image(str(path), 32).astype(int)
    got = preprocess(images=tf.constant([data]))["pixels"].numpy()[0]
    assert np.abs(got.astype(int) - want).max() <= tolerance, name


def test_cli_refuses_missing_checkpoint_and_busy_output(tiny_run, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  for args, expected in (
      ([f"--workdir={tmp_path / 'nothing'}", f"--output={tmp_path / 'o'}"],
       "error: No checkpoint in"),
      ([f"--workdir={tiny_run}", f"--output={busy}"],
       f"error: The output directory {busy} is not empty: pass a new or "
       "empty --output."),
  ):
    proc = subprocess.run(
        [sys.executable, "-m", "visionspeak_jax.tools.export", *args],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
  assert not (tmp_path / "o").exists()
  assert os.listdir(busy) == ["keep.txt"]
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]
