r"""Captions image files with a trained checkpoint; optionally draws attention.

  python -m visionspeak_jax.tools.caption --workdir=DIR [--beam_size=5] \
      [--batch_size=16] [--max_length=N] [--output=DIR] [--json] [--step=N] \
      [--best] [--suppress_unk] [--block_trigrams] [--min_length=N] IMAGE...

Prints `PATH: caption` per image in input order (a JSON object per line with
--json); an image that cannot be read prints `PATH: error: ...` on stderr and
the others are still captioned. Exit status: 0 when every image was
captioned, 1 when some failed, 2 when there is no usable checkpoint.

Only the checkpoint is needed (state, vocabulary and config are saved in it),
not the training data.
"""

from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Iterator, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from visionspeak_jax.data import images as images_lib
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoding
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import figures
from visionspeak_jax.run import restore
from visionspeak_jax.text import vocabulary as vocab_lib


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
    """The run's `decode_dtype`."""
    return self.config.decode_dtype

  def decoding_weights(self, decode_dtype: str) -> Any:
    """The decoder's `decoding_weights`, built once per dtype."""
    if decode_dtype not in self._weights:
      self._weights[decode_dtype] = captioner.decoding_weights(
          self.params["decoder"], decode_dtype,
          captioner.decoding_attention(self.config))
    return self._weights[decode_dtype]

  def constraints(self, *, suppress_unk: bool | None = None,
                  block_trigrams: bool | None = None,
                  min_length: int | None = None) -> decoding.Constraints:
    """The run's decoding constraints; an argument given overrides its field.

    Args:
      suppress_unk: never emit <unk>; default the config's.
      block_trigrams: no trigram twice in a caption; default the config's.
      min_length: words before EOS at least; default the config's.

    Returns:
      `captioner.constraints` of the config with the overrides.
    """
    return captioner.constraints(self.config, suppress_unk=suppress_unk,
                                 block_trigrams=block_trigrams,
                                 min_length=min_length)

  def compiled(self, beam_size: int, max_length: int, length_penalty: float,
               constraints: decoding.Constraints = decoding.Constraints()):
    """`captioner.predict`, jitted for these decoding settings."""
    key = (beam_size, max_length, length_penalty, constraints)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(functools.partial(
          captioner.predict, config=self.config, beam_size=beam_size,
          max_length=max_length, length_penalty=length_penalty,
          constraints=constraints))
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
    checkpoint.CheckpointError: there is no usable checkpoint, or it holds
      no image encoder.
  """
  run = restore.restore_run(workdir, step=step, best=best)
  if "encoder" not in run.params:
    raise checkpoint_lib.CheckpointError(
        f"The run in {workdir} trained on cached features and saved no image "
        "encoder: fine-tune it (configs/coco_finetune.py, or "
        f"--config.init_from={workdir} with --config.data_source=tfds) and "
        "caption with that run.")
  return Captioner(config=run.config, vocab=run.vocab, step=run.step,
                   params=run.params, batch_stats=run.batch_stats,
                   grid=captioner.grid(run.config))


def caption_arrays(captioner: Captioner, images: np.ndarray, *,
                   beam_size: int = 5, batch_size: int = 16,
                   max_length: int | None = None,
                   length_penalty: float = 0.0,
                   decode_dtype: str | None = None,
                   suppress_unk: bool | None = None,
                   block_trigrams: bool | None = None,
                   min_length: int | None = None) -> list[Caption]:
  """Captions preprocessed images.

  Every batch, the last one padded, has `batch_size` images, so a run
  compiles once per (batch_size, decoding settings).

  Args:
    captioner: from `load_captioner`.
    images: uint8 [N, S, S, 3], e.g. from `images.load_image`.
    beam_size: hypotheses per image; 1 is greedy.
    batch_size: images per compiled call.
    max_length: generated tokens at most (EOS included); default the
      config's `max_decode_length`.
    length_penalty: passed to the beam search.
    decode_dtype: "float32" or "bfloat16" matmul inputs; default the run's
      `decode_dtype`.
    suppress_unk: never emit <unk>; default the config's `suppress_unk`.
    block_trigrams: no trigram twice within a caption; default the config's
      `block_trigrams`.
    min_length: words before EOS at least; default the config's
      `min_length`.

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
  constraints = captioner.constraints(suppress_unk=suppress_unk,
                                      block_trigrams=block_trigrams,
                                      min_length=min_length)
  fn = captioner.compiled(beam_size, max_length, length_penalty, constraints)
  h, w = captioner.grid
  results = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    real = len(batch)
    if real < batch_size:
      pad = np.zeros((batch_size - real,) + batch.shape[1:], np.uint8)
      batch = np.concatenate([batch, pad])
    decoded = jax.device_get(fn(captioner.params, captioner.batch_stats,
                                weights, {"image": batch}))
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
        suppress_unk: bool | None = None,
        block_trigrams: bool | None = None,
        min_length: int | None = None,
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
    suppress_unk: never emit <unk>; default the run's config.
    block_trigrams: no trigram twice within a caption; default the run's
      config.
    min_length: words before EOS at least; default the run's config.
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
        images.append(images_lib.load_image(path, size))
        good.append(path)
      except images_lib.ImageError as e:
        print(f"{path}: error: {e.reason}.", file=stderr, flush=True)
        failed += 1
    if not good:
      continue
    captions = caption_arrays(captioner, np.stack(images),
                              beam_size=beam_size, batch_size=batch_size,
                              max_length=max_length,
                              decode_dtype=decode_dtype,
                              suppress_unk=suppress_unk,
                              block_trigrams=block_trigrams,
                              min_length=min_length)
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


def _define_flags() -> None:
  """Defines the CLI's flags; only when run as a program.

  The demo imports this module and has flags of its own.
  """
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
  flags.DEFINE_bool("best", False, "Use WORKDIR/best, the top checkpoint by "
                    "the evaluation metric, instead of WORKDIR/checkpoints.")
  flags.DEFINE_enum("decode_dtype", None, list(captioner.DTYPES),
                    "Matmul inputs of the decoder; bfloat16 is faster on CPUs "
                    "with AVX512-BF16 and on GPUs/TPUs. Default: the run's "
                    "config.decode_dtype.")
  flags.DEFINE_bool("suppress_unk", None, "Never emit <unk>. Default: the "
                    "run's config.suppress_unk.")
  flags.DEFINE_bool("block_trigrams", None, "No trigram twice within a "
                    "caption. Default: the run's config.block_trigrams.")
  flags.DEFINE_integer("min_length", None, "Words before EOS at least (0: no "
                       "minimum). Default: the run's config.min_length.",
                       lower_bound=0)
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
               best=FLAGS.best, decode_dtype=FLAGS.decode_dtype,
               suppress_unk=FLAGS.suppress_unk,
               block_trigrams=FLAGS.block_trigrams,
               min_length=FLAGS.min_length))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
