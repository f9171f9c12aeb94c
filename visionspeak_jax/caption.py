r"""Captions image files with a trained checkpoint; optionally draws attention.

  python -m visionspeak_jax.caption --workdir=DIR [--beam_size=5] \
      [--batch_size=16] [--max_length=N] [--output=DIR] [--json] [--step=N] \
      [--best] IMAGE...

Prints `PATH: caption` per image in input order (a JSON object per line with
--json); an image that cannot be read prints `PATH: error: ...` on stderr and
the others are still captioned. Exit status: 0 when every image was
captioned, 1 when some failed, 2 when there is no usable checkpoint.

Only the checkpoint is needed (state, vocabulary and config are saved in it),
not the training data.
"""

import dataclasses
import io
import json
import os
import sys
from typing import Any, Iterator, Sequence, TextIO
import warnings

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from visionspeak_jax import checkpoint as checkpoint_lib
from visionspeak_jax import figures
from visionspeak_jax import model
from visionspeak_jax import vocabulary as vocab_lib

# Images much larger than the model input are shrunk while decoding (JPEG
# DCT scaling) or right after (integer box reduction), but only down to this
# many times the model input size: a photo of ordinary size is never touched,
# so its caption matches training preprocessing exactly, and a huge one costs
# seconds, not minutes.
_PRE_REDUCE_MARGIN = 8

# Modes with transparency, composited on white.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# EXIF orientation -> the transpose that shows the image upright, as
# ImageOps.exif_transpose does (applied by hand: the JPEG pixels may come
# from TensorFlow's decoder).
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes whose pixel values can be averaged.
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")


class ImageError(ValueError):
  """An image file that cannot be captioned; `reason` says what to do."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"Cannot caption {path}: {reason}.")
    self.path = path
    self.reason = reason


# ---------------------------------------------------------------------------
# Images.


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in _ALPHA_MODES:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")
  if image.mode.startswith("I") or image.mode == "F":
    # 16/32-bit grey: PIL's convert("L") clips at 255, which turns most
    # 16-bit images white; scale the value range to 0..255 instead.
    values = np.nan_to_num(np.asarray(image, np.float64))
    lo, hi = values.min(), values.max()
    if image.mode == "F" and lo >= 0 and hi <= 1:
      values = values * 255.0  # Floats in [0, 1].
    elif image.mode == "F" and lo >= 0 and hi <= 255:
      pass  # Floats holding 8-bit values.
    elif lo >= 0 and hi <= 65535:
      values = values / 257.0  # 16-bit: 65535 -> 255 exactly.
    else:  # Anything else: stretch the range it uses.
      values = (values - lo) / max(hi - lo, 1e-12) * 255.0
    grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
  return image.convert("RGB")


def _tensorflow():
  """TensorFlow, imported on first use and kept off the accelerators."""
  # Imported here: TensorFlow only decodes and resizes in this module, and
  # the CLI sets TensorFlow's log level before the first import.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    # TensorFlow would otherwise take the accelerators' memory from JAX.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TensorFlow is already initialised by the caller; leave it be.
  return tf


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3] with the training pipeline's resize."""
  from visionspeak_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  tf = _tensorflow()
  with tf.device("/CPU:0"):
    return input_pipeline.resize_image(tf.constant(pixels), size).numpy()


def _decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG bytes -> uint8 [H, W, 3], bit for bit as TFDS decodes them."""
  # TensorFlow's default IDCT is the fast integer one, PIL's the accurate
  # one: up to 5 levels apart per pixel. The model was trained on the former.
  tf = _tensorflow()
  with tf.device("/CPU:0"):
    return tf.io.decode_jpeg(data, channels=3).numpy()


def load_image(path: str, size: int) -> np.ndarray:
  """Reads an image file as the model sees it.

  Handles every PIL mode (grey, palette, alpha composited on white, CMYK,
  16-bit), EXIF orientation, and very large files (decoded at reduced size).

  Args:
    path: the image file.
    size: the model input side S.

  Returns:
    uint8 [S, S, 3].

  Raises:
    ImageError: the file is missing, not an image, truncated, corrupt or too
      large; the message names the file and says what to do.
  """
  if os.path.isdir(path):
    raise ImageError(path, "it is a directory; pass image files")
  if not os.path.exists(path):
    raise ImageError(path, "no such file; check the path")
  if not os.access(path, os.R_OK):
    raise ImageError(path, "permission denied; make the file readable")
  if os.path.getsize(path) == 0:
    raise ImageError(path, "the file is empty; re-export or re-download it")
  try:
    with open(path, "rb") as f:
      data = f.read()
    with warnings.catch_warnings():
      # Large is fine here: the image is reduced while decoding. PIL still
      # refuses images past twice its limit (about 179 megapixels).
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        request = _PRE_REDUCE_MARGIN * size
        transpose = _EXIF_TRANSPOSE.get(_orientation(image))
        if (image.format == "JPEG" and image.mode in ("L", "RGB") and
            min(image.size) // request < 2):
          # Ordinary photos: the training pipeline's own decoder. PIL checks
          # the file first, as TensorFlow would log its complaints to stderr
          # besides raising.
          image.load()
          image = Image.fromarray(_decode_jpeg(data))
        else:
          image.draft(None, (request, request))  # Only JPEG acts on this.
          image.load()
          # Reduced before the copies that orientation and conversion make.
          image = _reduce(image, request)
        if transpose is not None:
          image = image.transpose(transpose)
        image = _reduce(_to_rgb(image), request)  # Modes skipped above too.
        pixels = np.asarray(image, np.uint8)  # [H, W, 3]
  except Image.DecompressionBombError as e:
    raise ImageError(path, "the image has too many pixels to decode safely; "
                     "downscale it first") from e
  except UnidentifiedImageError as e:
    raise ImageError(path, "not an image file PIL can read; convert it to "
                     "PNG or JPEG") from e
  except MemoryError as e:
    raise ImageError(path, "out of memory while decoding it; downscale it "
                     "first") from e
  except Exception as e:  # pylint: disable=broad-except
    # Decoders report damaged files as OSError, SyntaxError, ValueError,
    # struct.error, EOFError... depending on the format; to the user they
    # are all the same problem.
    raise ImageError(path, "the file is truncated or corrupt; re-export or "
                     "re-download it") from e
  return _resize(pixels, size)


def _reduce(image: Image.Image, request: int) -> Image.Image:
  """Box-averages by an integer factor while both sides stay >= request."""
  factor = min(image.width, image.height) // request
  # Averaging palette indices or bits would be meaningless.
  if factor < 2 or image.mode not in _REDUCIBLE_MODES:
    return image
  return image.reduce(factor)


def _orientation(image: Image.Image) -> int:
  """The EXIF orientation tag, 1 (as stored) when absent or unreadable."""
  try:
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    # A damaged EXIF block should not cost the caption.
    return 1


# ---------------------------------------------------------------------------
# The captioner.


@dataclasses.dataclass
class Captioner:
  """A restored model, ready to caption images (see `load_captioner`)."""
  config: ml_collections.ConfigDict
  vocab: vocab_lib.Vocabulary
  step: int
  params: Any  # {"encoder": ..., "decoder": ...}
  batch_stats: Any
  grid: tuple[int, int]  # (h, w) of the attention grid, h * w = R.
  _compiled: dict[tuple[Any, ...], Any] = dataclasses.field(
      default_factory=dict, repr=False)
  _weights: dict[str, Any] = dataclasses.field(default_factory=dict,
                                               repr=False)

  @property
  def image_size(self) -> int:
    return self.config.image_size

  @property
  def decode_dtype(self) -> str:
    """The run's `decode_dtype` (float32 for runs that predate it)."""
    return self.config.get("decode_dtype", "float32")

  def decoding_weights(self, decode_dtype: str) -> Any:
    """The decoder's `decoding_weights`, built once per dtype."""
    if decode_dtype not in self._weights:
      self._weights[decode_dtype] = model.decoding_weights(
          self.params["decoder"], decode_dtype)
    return self._weights[decode_dtype]

  def compiled(self, beam_size: int, max_length: int,
               length_penalty: float):
    """The jitted encode + decode for these decoding settings."""
    key = (beam_size, max_length, length_penalty)
    if key not in self._compiled:
      encoder = model.create_encoder(self.config)

      def caption_fn(params, batch_stats, weights, images):
        features, _ = model.encode(encoder, params, batch_stats, images,
                                   train=False)  # [B, R, C]
        return model.beam_caption(weights, features,
                                  beam_size=beam_size, max_length=max_length,
                                  length_penalty=length_penalty)

      self._compiled[key] = jax.jit(caption_fn)
    return self._compiled[key]


@dataclasses.dataclass
class Caption:
  """One image's caption."""
  words: list[str]
  score: float  # What the decoder ranks by (log-probability, penalised).
  alphas: np.ndarray  # [len(words), h, w] attention map of every word.

  @property
  def text(self) -> str:
    return " ".join(self.words)


def _no_checkpoint(directory: str) -> checkpoint_lib.CheckpointError:
  # Mirrors Checkpointer's message; checked here first because opening a
  # Checkpointer creates the directory, which a mistyped --workdir should not.
  return checkpoint_lib.CheckpointError(
      f"No checkpoint in {directory}: train first with visionspeak_jax.main, "
      "or point --workdir at a finished run.")


def load_captioner(workdir: str, step: int | None = None,
                   best: bool = False) -> Captioner:
  """Restores config, vocabulary and parameters from a run's checkpoint.

  Args:
    workdir: the training run's directory (holding `checkpoints/`).
    step: the checkpoint step; default the latest.
    best: use `best/`, the top checkpoint by the evaluation metric, instead
      of `checkpoints/`.

  Returns:
    A `Captioner`.

  Raises:
    checkpoint.CheckpointError: there is no usable checkpoint.
  """
  directory = os.path.abspath(
      os.path.join(workdir, "best" if best else "checkpoints"))
  if not os.path.isdir(directory):
    raise _no_checkpoint(directory)
  # Imported here: `train` pulls in TensorFlow (see `_resize`).
  from visionspeak_jax import train  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    step = ckpt.latest_step() if step is None else step
    vocab, config = ckpt.restore_metadata(step)
    # Shapes only: no parameters are initialised just to be overwritten.
    abstract = jax.eval_shape(lambda: train.create_train_state(
        jax.random.key(0), config, len(vocab)))
    device = jax.local_devices()[0]
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
                device)), abstract)
    state = ckpt.restore_state(target, step)
  except checkpoint_lib.CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Orbax reports a damaged or mismatched checkpoint in many ways; the
    # user's remedy is the same.
    detail = (str(e).strip().splitlines() or [""])[0][:200]
    raise checkpoint_lib.CheckpointError(
        f"The checkpoint of step {step} in {directory} cannot be restored "
        f"({type(e).__name__}: {detail}); pass --step with another saved "
        "step or retrain with this version.") from e
  finally:
    ckpt.close()
  if "encoder" not in state.params:
    raise checkpoint_lib.CheckpointError(
        f"The run in {workdir} trained on cached features and saved no image "
        "encoder: fine-tune it (--config.encoder_mode=fine_tune "
        f"--config.init_from={workdir}) and caption with that run.")
  return Captioner(config=config, vocab=vocab, step=int(step),
                   params=state.params, batch_stats=state.batch_stats,
                   grid=model.grid(config))


def caption_arrays(captioner: Captioner, images: np.ndarray, *,
                   beam_size: int = 5, batch_size: int = 16,
                   max_length: int | None = None,
                   length_penalty: float = 0.0,
                   decode_dtype: str | None = None) -> list[Caption]:
  """Captions preprocessed images.

  Every batch, the last one padded, has `batch_size` images, so a run
  compiles once per (batch_size, decoding settings).

  Args:
    captioner: from `load_captioner`.
    images: uint8 [N, S, S, 3], e.g. from `load_image`.
    beam_size: hypotheses per image; 1 is greedy.
    batch_size: images per compiled call.
    max_length: generated tokens at most (EOS included); default the
      config's `max_decode_length`.
    length_penalty: passed to the beam search.
    decode_dtype: "float32" or "bfloat16" matmul inputs; default the run's
      `decode_dtype`.

  Returns:
    N captions, in order.
  """
  images = np.asarray(images)
  size = captioner.image_size
  if (images.ndim != 4 or images.shape[1:] != (size, size, 3) or
      images.dtype != np.uint8):
    raise ValueError(f"Expected uint8 images [N, {size}, {size}, 3], got "
                     f"{images.dtype} {list(images.shape)}.")
  if beam_size < 1 or batch_size < 1:
    raise ValueError("beam_size and batch_size must be at least 1.")
  max_length = max_length or captioner.config.max_decode_length
  weights = captioner.decoding_weights(decode_dtype or captioner.decode_dtype)
  fn = captioner.compiled(beam_size, max_length, length_penalty)
  h, w = captioner.grid
  results = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      pad = np.zeros((batch_size - real,) + batch.shape[1:], np.uint8)
      batch = np.concatenate([batch, pad])
    decoded = jax.device_get(fn(captioner.params, captioner.batch_stats,
                                weights, batch))
    for i in range(real):
      words, positions = captioner.vocab.decode_with_positions(
          decoded.tokens[i])
      alphas = decoded.alphas[i][positions]  # [T, R], one map per word
      results.append(Caption(words=words, score=float(decoded.scores[i]),
                             alphas=alphas.reshape(len(words), h, w)))
  return results


# ---------------------------------------------------------------------------
# The command line, as a function (testable without flags).


def _figure_path(output: str, path: str, used: set[str]) -> str:
  """`output/<stem>.png`, with -1, -2... when two inputs share a stem."""
  stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  stem = stem or "image"
  name, n = stem, 0
  while name in used:
    n += 1
    name = f"{stem}-{n}"
  used.add(name)
  return os.path.join(output, name + ".png")


def _chunks(items: Sequence[str], n: int) -> Iterator[Sequence[str]]:
  for start in range(0, len(items), n):
    yield items[start:start + n]


def run(paths: Sequence[str], *, workdir: str, beam_size: int = 5,
        batch_size: int = 16, max_length: int | None = None,
        output: str | None = None, as_json: bool = False,
        step: int | None = None, best: bool = False,
        decode_dtype: str | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
  """Captions image files and prints the results: what the CLI does.

  Images are read and captioned `batch_size` at a time, so memory stays
  bounded however many files are given.

  Args:
    paths: image files.
    workdir: the training run's directory.
    beam_size: hypotheses per image; 1 is greedy.
    batch_size: images per compiled call (at most the number of paths).
    max_length: generated tokens at most; default the config's.
    output: a directory for attention figures, `<image stem>.png` each.
    as_json: print a JSON object per image instead of `PATH: caption`.
    step: the checkpoint step; default the latest.
    best: use the run's best checkpoint instead of its latest.
    decode_dtype: "float32" or "bfloat16" matmul inputs; default the run's.
    stdout: where captions go (default sys.stdout).
    stderr: where errors go (default sys.stderr).

  Returns:
    The exit status: 0 all captioned, 1 some images failed, 2 no checkpoint
    or no usable output directory.
  """
  stdout = stdout or sys.stdout
  stderr = stderr or sys.stderr
  try:
    captioner = load_captioner(workdir, step, best)
  except checkpoint_lib.CheckpointError as e:
    print(f"error: {e}", file=stderr, flush=True)
    return 2
  if output:
    try:
      os.makedirs(output, exist_ok=True)
    except OSError as e:
      print(f"error: Cannot create the figure directory {output} "
            f"({e.strerror}); pass another --output.", file=stderr,
            flush=True)
      return 2
  # Never more than the paths: one image should not run a batch of 16.
  batch_size = max(1, min(batch_size, len(paths)))
  size = captioner.image_size
  used_names: set[str] = set()
  failed = 0
  for chunk in _chunks(paths, batch_size):
    images, good = [], []
    for path in chunk:
      try:
        images.append(load_image(path, size))
        good.append(path)
      except ImageError as e:
        print(f"{path}: error: {e.reason}.", file=stderr, flush=True)
        failed += 1
    if not good:
      continue
    captions = caption_arrays(captioner, np.stack(images),
                              beam_size=beam_size, batch_size=batch_size,
                              max_length=max_length,
                              decode_dtype=decode_dtype)
    for path, image, caption in zip(good, images, captions):
      figure = None
      if output:
        figure = _figure_path(output, path, used_names)
        try:
          figures.attention_figure(image, caption.words, caption.alphas,
                                   figure)
        except OSError as e:
          print(f"{path}: error: cannot write the figure {figure} "
                f"({e.strerror}); check --output.", file=stderr, flush=True)
          failed += 1
          figure = None
      if as_json:
        record = {"image": path, "caption": caption.text,
                  "score": caption.score, "words": caption.words}
        if figure:
          record["figure"] = figure
        print(json.dumps(record), file=stdout, flush=True)
      else:
        print(f"{path}: {caption.text}", file=stdout, flush=True)
  return 1 if failed else 0


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (with "
                    "checkpoints/).")
flags.DEFINE_integer("beam_size", 5, "Beam size; 1 is greedy.", lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Images per compiled batch.",
                     lower_bound=1)
flags.DEFINE_integer("max_length", None, "Generated tokens at most (EOS "
                     "included); default the config's max_decode_length.",
                     lower_bound=1)
flags.DEFINE_string("output", None, "Directory for attention figures, one "
                    "<image stem>.png per image.")
flags.DEFINE_bool("json", False, "Print one JSON object per image.")
flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.",
                     lower_bound=0)
flags.DEFINE_bool("best", False, "Use WORKDIR/best, the top checkpoint by the "
                  "evaluation metric, instead of WORKDIR/checkpoints.")
flags.DEFINE_enum("decode_dtype", None, list(model.DECODE_DTYPES),
                  "Matmul inputs of the decoder; bfloat16 is faster on CPUs "
                  "with AVX512-BF16 and on GPUs/TPUs. Default: the run's "
                  "config.decode_dtype.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Pass one or more image files after the flags.",
                         exitcode=2)
  # Library log lines (Orbax, TensorFlow) would bury the captions and the
  # one-line errors. TensorFlow announces oneDNN at import whatever its log
  # level; it only decodes and resizes images here, which oneDNN does not
  # touch.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  sys.exit(run(argv[1:], workdir=FLAGS.workdir, beam_size=FLAGS.beam_size,
               batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
               output=FLAGS.output, as_json=FLAGS.json, step=FLAGS.step,
               best=FLAGS.best, decode_dtype=FLAGS.decode_dtype))


if __name__ == "__main__":
  app.run(main)
