r"""Exports a trained captioner as artifacts that run without this code.

  python -m visionspeak_jax.tools.export --workdir=RUN [--best | --step=N] \
      --output=DIR [--beam_size=N] [--max_length=N] [--decode_dtype=D] \
      [--platforms=cpu,cuda,tpu]

DIR then holds the whole captioner (ImageNet normalisation, the encoder, the
beam search and every word's attention map) twice over, with the settings of
the run unless a flag says otherwise:

- `captioner.jax`: a `jax.export` module (StableHLO) of uint8 images
  [batch, S, S, 3] -> tokens [batch, L] int32, scores [batch] float32,
  lengths [batch] int32 (words before EOS) and attention [batch, L, h, w]
  float32, the batch dimension symbolic. Load it with
  `jax.export.deserialize(open(path, "rb").read())` and call `.call(images)`:
  only jax and numpy are needed.
- `saved_model/`: a TensorFlow SavedModel. Its `serving_default` signature
  takes `images`, a string tensor [n] of encoded image files (JPEG, PNG, GIF,
  BMP or WebP, any size), decodes and resizes them in the graph as training
  does (`data/images.py`, `input_pipeline.resize_image`), and returns
  `captions` (strings) with the module's four outputs. Its `preprocess`
  signature returns the pixels only, uint8 [n, S, S, 3]: the service
  (`tools/serve.py`) decodes each upload with it.
- `vocab.json` (the word of every token id) and `manifest.json` (input size,
  grid, decoding settings, dtype, run and step, versions).

The SavedModel is built with Orbax Export (`orbax.export.JaxModule`, which
converts with `jax2tf`): its variables hold the weights, and pre- and
post-processing are TensorFlow functions around the converted model.

Exit status: 0 on success, 2 when there is no usable checkpoint or the output
directory cannot be used.
"""

from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

import visionspeak_jax
from visionspeak_jax import errors
from visionspeak_jax.data import images as images_lib
from visionspeak_jax.models import captioner as captioner_lib
from visionspeak_jax.models import decoding
from visionspeak_jax.platform import dtypes
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.tools import caption

MODULE_FILE = "captioner.jax"
SAVED_MODEL_DIR = "saved_model"
VOCAB_FILE = "vocab.json"
MANIFEST_FILE = "manifest.json"
# Bumped when the layout or the meaning of a field changes.
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(errors.UserError):
  """An export that cannot be written; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What is fixed at export: the decoding and the platforms."""
  beam_size: int
  max_length: int
  length_penalty: float
  decode_dtype: str  # "float32" or "bfloat16"
  constraints: decoding.Constraints
  platforms: tuple[str, ...] = PLATFORMS


def settings_of(model: caption.Captioner, *, beam_size: int | None = None,
                max_length: int | None = None,
                decode_dtype: str | None = None,
                platforms: Sequence[str] = PLATFORMS) -> Settings:
  """The run's decoding settings, an argument given overriding its field."""
  config = model.config
  return Settings(
      beam_size=beam_size or config.beam_size,
      max_length=max_length or config.max_decode_length,
      length_penalty=float(config.length_penalty),
      decode_dtype=dtypes.name(decode_dtype or model.decode_dtype),
      constraints=model.constraints(), platforms=tuple(platforms))


def caption_function(model: caption.Captioner, settings: Settings
                     ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """f(variables, images) -> the exported outputs, pure and traceable.

  `variables` is `variables_of(model, settings)`; `images` uint8
  [B, S, S, 3]. Tokens, scores and attention equal
  `caption.caption_arrays`'.
  """
  config = model.config
  h, w = model.grid

  def fn(variables, images):
    decoded = captioner_lib.predict(
        {"encoder": variables["encoder"]}, variables["batch_stats"],
        variables["decoding"], {"image": images}, config=config,
        beam_size=settings.beam_size, max_length=settings.max_length,
        length_penalty=settings.length_penalty,
        constraints=settings.constraints)
    b, length = decoded.tokens.shape
    return {"tokens": decoded.tokens,
            "scores": decoded.scores.astype(jnp.float32),
            "lengths": decoded.lengths,
            "attention": decoded.alphas.astype(jnp.float32).reshape(
                b, length, h, w)}

  return fn


def variables_of(model: caption.Captioner, settings: Settings
                 ) -> dict[str, Any]:
  """The exported state: the encoder and the decoder's decoding weights.

  The decoding weights are built as the caption tool builds them, once,
  rather than inside the program: they hold a [V, E] @ [E, 4H] product that
  would otherwise cost every call (or every compile) a large matmul.
  """
  return {"encoder": model.params["encoder"],
          "batch_stats": model.batch_stats,
          "decoding": model.decoding_weights(settings.decode_dtype)}


def export_module(model: caption.Captioner, settings: Settings
                  ) -> jax.export.Exported:
  """The `jax.export` module of uint8 [b, S, S, 3] images, b symbolic."""
  fn = caption_function(model, settings)
  variables = variables_of(model, settings)
  size = model.image_size
  batch, = jax.export.symbolic_shape("batch")
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  return jax.export.export(
      jax.jit(lambda x: fn(variables, x)),
      platforms=settings.platforms)(images)


# ---------------------------------------------------------------------------
# The SavedModel: TensorFlow around the converted model.


def decode_image_tf(data, size: int):
  """One encoded image (a scalar string) -> uint8 [size, size, 3], in TF.

  As `data/images.py` reads files: TensorFlow's decoder (its JPEG IDCT is the
  one training used), transparency composited on white, grey spread to RGB,
  then `input_pipeline.resize_image`. Not done here: EXIF orientation, and
  the integer pre-reduction of images over 8 times the input size.
  """
  from visionspeak_jax.data import input_pipeline
  tf = images_lib.tensorflow()
  tf.debugging.assert_greater(
      tf.strings.length(data), 0,
      message="An input is an empty string, not an encoded image.")
  image = tf.io.decode_image(data, channels=0, expand_animations=False,
                             dtype=tf.uint8)  # [H, W, C], C in 1..4
  channels = tf.shape(image)[-1]
  has_alpha = tf.equal(channels % 2, 0)  # LA or RGBA.
  colour = tf.cast(image[..., :channels - tf.cast(has_alpha, tf.int32)],
                   tf.float32)
  colour = tf.cond(tf.shape(colour)[-1] == 1,
                   lambda: tf.tile(colour, [1, 1, 3]), lambda: colour)
  alpha = tf.cond(has_alpha,
                  lambda: tf.cast(image[..., -1:], tf.float32),
                  lambda: tf.fill(tf.shape(colour[..., :1]), 255.0))
  # On white; opaque pixels come out exactly as they were.
  rgb = (colour * alpha + 255.0 * (255.0 - alpha)) / 255.0
  rgb = tf.cast(tf.clip_by_value(tf.round(rgb), 0, 255), tf.uint8)
  rgb = tf.ensure_shape(rgb, [None, None, 3])
  return input_pipeline.resize_image(rgb, size)


def _words_tf(vocab: vocab_lib.Vocabulary, tokens):
  """Tokens [n, L] -> caption strings [n], as `Vocabulary.decode` joins them."""
  tf = images_lib.tensorflow()
  words = tf.constant(list(vocab.words) + [vocab_lib.UNK])
  in_range = (tokens >= 0) & (tokens < len(vocab.words))
  ids = tf.where(in_range, tokens, len(vocab.words))  # Unknown ids: <unk>.
  before_eos = tf.equal(
      tf.cumsum(tf.cast(tf.equal(tokens, vocab_lib.EOS_ID), tf.int32),
                axis=1), 0)
  keep = (before_eos & tf.not_equal(tokens, vocab_lib.PAD_ID) &
          tf.not_equal(tokens, vocab_lib.BOS_ID))
  kept = tf.ragged.boolean_mask(tf.gather(words, ids), keep)
  return tf.strings.reduce_join(kept, axis=1, separator=" ")


@contextlib.contextmanager
def _stablehlo_for():
  """Serializes StableHLO that this TensorFlow can read while in the block.

  `jax2tf` writes the model as StableHLO bytecode for TensorFlow's
  XlaCallModule op, targeting a version about a month older than this jax.
  The pinned TensorFlow may be older than that, so the bytecode targets the
  newest version both sides know instead. jax has no public switch for it.
  """
  from jax._src import xla_bridge
  from jax._src.export import _export
  from jax._src.lib import _jax
  from jax._src.lib.mlir.dialects import hlo
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
  mine = hlo.get_version_from_compatibility_requirement(
      hlo.StablehloCompatibilityRequirement.WEEK_4)
  theirs = tf_stablehlo.get_current_version()
  target = min(mine, theirs, key=lambda v: tuple(map(int, v.split("."))))
  original = _export._module_to_bytecode  # pylint: disable=protected-access

  def to_bytecode(module):
    return _jax.mlir.serialize_portable_artifact(
        module, target, xla_bridge.get_backend().serialize_with_sdy)

  _export._module_to_bytecode = to_bytecode  # pylint: disable=protected-access
  try:
    yield target
  finally:
    _export._module_to_bytecode = original  # pylint: disable=protected-access


def save_saved_model(model: caption.Captioner, settings: Settings,
                     directory: str) -> str:
  """Writes the SavedModel; returns the StableHLO version it holds."""
  tf = images_lib.tensorflow()
  from orbax import export as orbax_export
  size = model.image_size
  fn = caption_function(model, settings)
  module = orbax_export.JaxModule(
      variables_of(model, settings), fn, trainable=False,
      input_polymorphic_shape="(b, ...)",
      jax2tf_kwargs={"native_serialization_platforms": settings.platforms})

  def preprocess(images):
    return tf.map_fn(functools.partial(decode_image_tf, size=size), images,
                     fn_output_signature=tf.TensorSpec([size, size, 3],
                                                       tf.uint8))

  def postprocess(outputs):
    return {"captions": _words_tf(model.vocab, outputs["tokens"]),
            **outputs}

  images = tf.TensorSpec([None], tf.string, name="images")
  configs = [
      orbax_export.ServingConfig(
          "serving_default", input_signature=[images],
          tf_preprocessor=preprocess, tf_postprocessor=postprocess),
  ]
  with _stablehlo_for() as version:
    manager = orbax_export.ExportManager(module, configs)
    # The pixels alone, for a server that decodes each upload by itself.
    manager.tf_module.preprocess = tf.function(
        lambda images: {"pixels": preprocess(images)},
        input_signature=[images])
    manager.save(directory, signature_overrides={
        "preprocess": manager.tf_module.preprocess.get_concrete_function()})
  return version


def manifest(model: caption.Captioner, settings: Settings, *, workdir: str,
             best: bool, stablehlo_version: str) -> dict[str, Any]:
  """What a consumer of the artifacts needs to know, as JSON."""
  h, w = model.grid
  config = model.config
  return {
      "format_version": FORMAT_VERSION,
      "visionspeak_jax_version": visionspeak_jax.__version__,
      "jax_version": jax.__version__,
      "run": {"workdir": os.path.abspath(workdir),
              "checkpoint": "best" if best else "checkpoints",
              "step": model.step},
      "input": {"image_size": model.image_size, "channels": 3,
                "dtype": "uint8",
                "normalization": "ImageNet mean/std, inside the model"},
      "grid": [h, w],
      "num_regions": h * w,
      "encoder": {"resnet_size": str(config.model.resnet_size),
                  "dtype": dtypes.name(config.dtype)},
      "decoding": {
          "beam_size": settings.beam_size,
          "max_length": settings.max_length,
          "length_penalty": settings.length_penalty,
          "decode_dtype": settings.decode_dtype,
          "attention": captioner_lib.decoding_attention(config),
          "suppress_ids": list(settings.constraints.suppress_ids),
          "min_length": settings.constraints.min_length,
          "block_trigrams": settings.constraints.block_trigrams,
      },
      "vocab_size": len(model.vocab.words),
      "special_ids": {"pad": vocab_lib.PAD_ID, "bos": vocab_lib.BOS_ID,
                      "eos": vocab_lib.EOS_ID, "unk": vocab_lib.UNK_ID},
      "outputs": {
          "tokens": "int32 [batch, max_length]; PAD after EOS",
          "scores": "float32 [batch]; what the beam search ranks by",
          "lengths": "int32 [batch]; words before EOS",
          "attention": (f"float32 [batch, max_length, {h}, {w}]; the map "
                        "that produced each token, 0 after EOS"),
          "captions": "string [batch]; saved_model only",
      },
      "files": {
          "module": MODULE_FILE, "saved_model": SAVED_MODEL_DIR,
          "vocab": VOCAB_FILE,
      },
      "module": {"platforms": list(settings.platforms),
                 "batch": "symbolic"},
      "saved_model": {"signatures": ["serving_default", "preprocess"],
                      "input": "images: string [n], encoded image files",
                      "stablehlo_version": stablehlo_version},
  }


def _check_output(output: str) -> None:
  """Refuses an output that exists and is not an empty directory."""
  if os.path.isdir(output):
    if os.listdir(output):
      raise ExportError(
          f"The output directory {output} is not empty: pass a new or empty "
          "--output.")
  elif os.path.exists(output):
    raise ExportError(f"The output {output} is a file: pass a new or empty "
                      "directory as --output.")


def export(workdir: str, output: str, *, step: int | None = None,
           best: bool = False, beam_size: int | None = None,
           max_length: int | None = None, decode_dtype: str | None = None,
           platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  """Writes both artifacts of a run's checkpoint into `output`.

  Everything is written beside `output` first and moved into place at the
  end, so a failed export leaves nothing behind.

  Returns:
    The manifest.

  Raises:
    checkpoint.CheckpointError: no usable checkpoint.
    ExportError: `output` exists and is not an empty directory, or cannot
      be written.
  """
  output = os.path.abspath(output)
  _check_output(output)
  model = caption.load_captioner(workdir, step, best)
  settings = settings_of(model, beam_size=beam_size, max_length=max_length,
                         decode_dtype=decode_dtype, platforms=platforms)
  parent = os.path.dirname(output)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0o700 is for secrets.
  except OSError as e:
    raise ExportError(f"Cannot write beside {output} ({e.strerror}): pass "
                      "another --output.") from e
  try:
    logging.info("Exporting step %d of %s for %s.", model.step, workdir,
                 ", ".join(settings.platforms))
    exported = export_module(model, settings)
    with open(os.path.join(staging, MODULE_FILE), "wb") as f:
      f.write(exported.serialize())
    version = save_saved_model(model, settings,
                               os.path.join(staging, SAVED_MODEL_DIR))
    model.vocab.save(os.path.join(staging, VOCAB_FILE))
    info = manifest(model, settings, workdir=workdir, best=best,
                    stablehlo_version=version)
    with open(os.path.join(staging, MANIFEST_FILE), "w") as f:
      json.dump(info, f, indent=2)
      f.write("\n")
    _check_output(output)  # Nothing appeared there meanwhile.
    if os.path.isdir(output):
      os.rmdir(output)
    os.replace(staging, output)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return info


# ---------------------------------------------------------------------------
# The command line.


def run(*, workdir: str, output: str, step: int | None = None,
        best: bool = False, beam_size: int | None = None,
        max_length: int | None = None, decode_dtype: str | None = None,
        platforms: Sequence[str] = PLATFORMS,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
  """What the CLI does; returns the exit status (0, or 2 on a user error)."""
  stdout = stdout or sys.stdout
  stderr = stderr or sys.stderr
  try:
    info = export(workdir, output, step=step, best=best, beam_size=beam_size,
                  max_length=max_length, decode_dtype=decode_dtype,
                  platforms=platforms)
  except errors.UserError as e:  # CheckpointError, ExportError...
    print(f"error: {e}", file=stderr, flush=True)
    return 2
  d = info["decoding"]
  print(f"Exported step {info['run']['step']} to {os.path.abspath(output)}: "
        f"{info['input']['image_size']} px images, "
        f"{info['grid'][0]}x{info['grid'][1]} regions, beam "
        f"{d['beam_size']}, at most {d['max_length']} tokens, "
        f"{d['decode_dtype']}.", file=stdout, flush=True)
  return 0


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training run directory (with "
                      "checkpoints/).")
  flags.DEFINE_string("output", None, "New or empty directory for the "
                      "artifacts.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.",
                       lower_bound=0)
  flags.DEFINE_bool("best", False, "Export WORKDIR/best, the top checkpoint "
                    "by the evaluation metric.")
  flags.DEFINE_integer("beam_size", None, "Beam size (1 is greedy); default "
                       "the run's config.beam_size.", lower_bound=1)
  flags.DEFINE_integer("max_length", None, "Generated tokens at most (EOS "
                       "included); default the run's max_decode_length.",
                       lower_bound=1)
  flags.DEFINE_enum("decode_dtype", None, list(captioner_lib.DTYPES),
                    "Matmul inputs of the decoder; default the run's "
                    "config.decode_dtype.")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms the jax.export "
                    "module and the SavedModel are lowered for.")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.",
                         exitcode=2)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  unknown = sorted(set(FLAGS.platforms) - set(PLATFORMS))
  if unknown or not FLAGS.platforms:
    raise app.UsageError(f"--platforms takes some of {','.join(PLATFORMS)}, "
                         f"got {','.join(FLAGS.platforms)}.", exitcode=2)
  if FLAGS.best and FLAGS.step is not None:
    raise app.UsageError("Pass --best or --step, not both.", exitcode=2)
  sys.exit(run(workdir=FLAGS.workdir, output=FLAGS.output, step=FLAGS.step,
               best=FLAGS.best, beam_size=FLAGS.beam_size,
               max_length=FLAGS.max_length, decode_dtype=FLAGS.decode_dtype,
               platforms=FLAGS.platforms))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
