r"""A local web page: caption an image and see where each word looked.

  pip install -e '.[demo]'
  python -m visionspeak_jax.tools.demo --workdir=/tmp/shapes [--port=7860] \
      [--best] [--step=N] [--beam_sizes=1,3,5]

Upload or drop an image (or click a bundled shapes example): the page shows
the beam-search caption with its score, the words as buttons, and for the
selected word its attention map over the image; below, the whole attention
figure (`figures.attention_figure`). Beam size and decode dtype are
adjustable.

The checkpoint is restored, and the decoder compiled for every offered
(beam size, dtype), once at start-up; requests only run it. They go through
Gradio's queue one at a time. A file that is not a usable image gets one
sentence on the page, and the page keeps working. Nothing is loaded from the
internet: Gradio's analytics and version check are off, no share link.
"""

from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

# pylint: disable=g-import-not-at-top,wrong-import-position
import atexit
import dataclasses
import hashlib
import io
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import importlib_resources
import numpy as np
from PIL import Image

from visionspeak_jax import errors
from visionspeak_jax.data import images as images_lib
from visionspeak_jax.models import captioner
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import figures
from visionspeak_jax.tools import caption as caption_lib

# Bundled example images: shapes test-split images with 1, 2 and 3 objects
# (`write_examples` draws them again).
EXAMPLES_PACKAGE = "visionspeak_jax.tools.demo_examples"
_EXAMPLES = (("one_shape", 2), ("two_shapes", 1), ("three_shapes", 0))
DEFAULT_BEAM_SIZES = (1, 3, 5)
_PANEL = 320  # Side of the attention panel on the page, in pixels.


def write_examples(directory: str) -> list[str]:
  """Draws the bundled example images with the shapes set's own code.

  Args:
    directory: where the PNGs go.

  Returns:
    Their paths.
  """
  from visionspeak_jax.data.datasets import shapes
  paths = []
  for name, index in _EXAMPLES:
    example = shapes.generate_example(shapes.example_rng("test", index),
                                      shapes.example_id("test", index))
    path = os.path.join(directory, f"{name}.png")
    Image.fromarray(example["image"]).save(path, format="png", optimize=True)
    paths.append(path)
  return paths


def example_paths() -> list[str]:
  """The bundled example images, in `_EXAMPLES` order."""
  root = importlib_resources.files(EXAMPLES_PACKAGE)
  return [str(root / f"{name}.png") for name, _ in _EXAMPLES]


@dataclasses.dataclass
class Result:
  """One captioned image, kept per browser session for the word buttons."""
  image: np.ndarray  # uint8 [S, S, 3], what the model saw
  caption: caption_lib.Caption
  seconds: float


class DemoModel:
  """A restored captioner, compiled for every offered setting up front."""

  def __init__(self, captioner: caption_lib.Captioner,
               beam_sizes: Sequence[int] = DEFAULT_BEAM_SIZES,
               decode_dtypes: Sequence[str] = tuple(captioner.DTYPES)):
    if not beam_sizes or min(beam_sizes) < 1:
      raise errors.ConfigError("Pass beam sizes of at least 1, e.g. "
                               "--beam_sizes=1,3,5.")
    self.captioner = captioner
    self.beam_sizes = tuple(sorted(set(beam_sizes)))
    self.decode_dtypes = tuple(decode_dtypes)
    # The queue runs one request at a time; the lock also covers callers
    # outside Gradio (tests, notebooks).
    self._lock = threading.Lock()
    start = time.time()
    blank = np.zeros((1, captioner.image_size, captioner.image_size, 3),
                     np.uint8)
    for beam_size in self.beam_sizes:
      for dtype in self.decode_dtypes:
        self._caption(blank, beam_size, dtype)
    logging.info("Compiled %d decoding settings in %.1f s.",
                 len(self.beam_sizes) * len(self.decode_dtypes),
                 time.time() - start)

  def _caption(self, images: np.ndarray, beam_size: int,
               decode_dtype: str) -> caption_lib.Caption:
    with self._lock:
      (result,) = caption_lib.caption_arrays(
          self.captioner, images, beam_size=beam_size, batch_size=1,
          decode_dtype=decode_dtype)
    return result

  def caption_file(self, path: str, beam_size: int,
                   decode_dtype: str) -> Result:
    """Reads and captions an image file.

    Raises:
      images.ImageError: the file is not a usable image.
      ValueError: a beam size or dtype that was not compiled (a bug of the
        page, which only offers those).
    """
    if beam_size not in self.beam_sizes or (
        decode_dtype not in self.decode_dtypes):
      raise ValueError(f"Beam size {beam_size} / {decode_dtype} was not "
                       f"compiled; offered: {self.beam_sizes}, "
                       f"{self.decode_dtypes}.")
    start = time.time()
    image = images_lib.load_image(path, self.captioner.image_size)
    result = self._caption(image[None], beam_size, decode_dtype)
    return Result(image=image, caption=result, seconds=time.time() - start)


def figure_image(result: Result) -> np.ndarray:
  """The whole attention figure of a result, uint8 [H, W, 3]."""
  return figures.attention_figure_array(result.image, result.caption.words,
                                        result.caption.alphas, panel_size=160)


def word_panel(result: Result, index: int) -> np.ndarray:
  """The image with word `index`'s attention over it, uint8 [P, P, 3]."""
  return figures.overlay(result.image, result.caption.alphas[index],
                         size=_PANEL)


class PngFiles:
  """Arrays written as PNG files named by their content, for the page.

  Gradio saves an array output into its cache by rewriting a file named by
  the content's hash, so a second request with the same result rewrites
  the file while the browser may be reading it. A file path output instead
  is copied into the cache atomically, and an existing copy is reused; these
  files are written atomically too.
  """

  def __init__(self, keep: int = 512):
    self.directory = tempfile.mkdtemp(prefix="visionspeak-demo-")
    self._keep = keep  # Files kept; the oldest half goes beyond that.
    atexit.register(shutil.rmtree, self.directory, ignore_errors=True)

  def path(self, array: np.ndarray) -> str:
    """The PNG file of uint8 [H, W, 3] `array`."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    data = buffer.getvalue()
    path = os.path.join(self.directory,
                        hashlib.sha256(data).hexdigest()[:32] + ".png")
    if not os.path.exists(path):
      fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
      self._prune()
    return path

  def _prune(self) -> None:
    names = [n for n in os.listdir(self.directory) if n.endswith(".png")]
    if len(names) <= self._keep:
      return
    # Gradio has copied every file that an answered request returned.
    paths = sorted((os.path.join(self.directory, n) for n in names),
                   key=os.path.getmtime)
    for old in paths[:len(paths) - self._keep // 2]:
      try:
        os.remove(old)
      except OSError:
        pass  # Removed by another request's prune.


def _gradio():
  """Gradio, imported with its analytics off; a clear error if missing."""
  # Read at import: off before Gradio can start its version check thread.
  os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
  try:
    import gradio  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ConfigError(
        "The web demo needs Gradio: pip install -e '.[demo]'.") from e
  return gradio


def build(demo_model: DemoModel, run_name: str = ""):
  """The page, as a `gradio.Blocks` (not launched).

  Args:
    demo_model: the compiled model.
    run_name: shown in the header, e.g. the workdir.

  Returns:
    The Blocks.
  """
  gr = _gradio()
  captioner = demo_model.captioner
  pngs = PngFiles()
  no_result = ("", gr.Radio(choices=[], value=None), None, None, None)

  def caption(path, beam_size, decode_dtype):
    if not path:
      return ("Upload or drop an image, or click an example.",) + no_result
    name = os.path.basename(path)
    try:
      result = demo_model.caption_file(path, int(beam_size), decode_dtype)
    except images_lib.ImageError as e:
      return (f"**Cannot caption {name}**: {e.reason}.",) + no_result
    words = result.caption.words
    if not words:
      status = f"{name}: the model wrote an empty caption."
      return (status,) + no_result[:-1] + (result,)
    status = (f"Captioned {name} in {result.seconds:.2f} s (beam "
              f"{beam_size}, {decode_dtype}). Click a word to see where "
              "the model looked for it.")
    text = f"{result.caption.text}   (score {result.caption.score:.3f})"
    choices = [(word, i) for i, word in enumerate(words)]
    return (status, text, gr.Radio(choices=choices, value=0),
            pngs.path(word_panel(result, 0)), pngs.path(figure_image(result)),
            result)

  def select_word(index, result):
    if result is None or index is None:
      return None
    return pngs.path(word_panel(result, int(index)))

  title = "VisionSpeak-JAX: Show, Attend and Tell"
  with gr.Blocks(title=title, analytics_enabled=False) as blocks:
    gr.Markdown(f"## {title}\nCheckpoint of step {captioner.step}"
                f"{' in ' + run_name if run_name else ''}: every word of the "
                "caption comes with the map of where the model looked "
                "(white) while writing it.")
    result_state = gr.State(None)
    with gr.Row():
      with gr.Column(scale=1):
        image_file = gr.File(label="Image: upload or drop a file",
                             type="filepath", elem_id="image-file")
        gr.Examples(examples=[[p] for p in example_paths()],
                    inputs=[image_file], label="Examples (shapes images)")
        beam_size = gr.Radio(choices=list(demo_model.beam_sizes),
                             value=min(3, max(demo_model.beam_sizes)),
                             label="Beam size (1 is greedy)",
                             elem_id="beam-size")
        decode_dtype = gr.Radio(choices=list(demo_model.decode_dtypes),
                                value=captioner.decode_dtype
                                if captioner.decode_dtype in
                                demo_model.decode_dtypes
                                else demo_model.decode_dtypes[0],
                                label="Decoder matmul dtype",
                                elem_id="decode-dtype")
      with gr.Column(scale=2):
        status = gr.Markdown("Upload or drop an image, or click an example.",
                             elem_id="status")
        caption_text = gr.Textbox(label="Caption (best beam) and its score",
                                  interactive=False, elem_id="caption")
        words = gr.Radio(choices=[], label="Words: click one",
                         elem_id="words")
        attention = gr.Image(label="Attention of the selected word",
                             type="filepath", interactive=False,
                             height=_PANEL, elem_id="attention")
    figure = gr.Image(label="Every word's attention", type="filepath",
                      interactive=False, elem_id="figure")

    outputs = [status, caption_text, words, attention, figure, result_state]
    inputs = [image_file, beam_size, decode_dtype]
    image_file.change(caption, inputs, outputs)
    beam_size.input(caption, inputs, outputs)
    decode_dtype.input(caption, inputs, outputs)
    words.input(select_word, [words, result_state], [attention])
  # One request at a time: the model is one compiled function on one
  # device; more requests wait in the queue.
  blocks.queue(default_concurrency_limit=1, max_size=64)
  return blocks


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(blocks, port: int, *, block: bool = True,
           max_file_size: str = "20mb", host: str = "127.0.0.1") -> str:
  """Serves the page on `host:port`; returns its URL.

  Args:
    blocks: from `build`.
    port: the TCP port.
    block: wait until interrupted (False: return at once, for tests).
    max_file_size: larger uploads are refused by the page with a message.
    host: the interface to listen on; the default serves this machine only.
  """
  _, url, _ = blocks.launch(
      server_name=host, server_port=port, share=False,
      prevent_thread_lock=not block, max_file_size=max_file_size,
      ssr_mode=False, quiet=True, show_error=True,
      allowed_paths=[str(importlib_resources.files(EXAMPLES_PACKAGE))])
  return url


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the demo's flags; only when run as a program."""
  flags.DEFINE_string("workdir", None, "Training run directory (with "
                      "checkpoints/).")
  flags.DEFINE_integer("port", 7860, "Port of the page on 127.0.0.1.",
                       lower_bound=1, upper_bound=65535)
  flags.DEFINE_string("host", "127.0.0.1", "Interface to serve on; 0.0.0.0 "
                      "shows the page to the whole network.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.",
                       lower_bound=0)
  flags.DEFINE_bool("best", False, "Use WORKDIR/best, the top checkpoint by "
                    "the evaluation metric.")
  flags.DEFINE_list("beam_sizes", [str(b) for b in DEFAULT_BEAM_SIZES],
                    "Beam sizes offered on the page (each compiled at start).")
  flags.DEFINE_string("max_file_size", "20mb", "Largest upload accepted.")
  flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.", exitcode=2)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if not FLAGS["verbosity"].present:
    # Orbax's and the HTTP client's log lines would bury the page's address.
    logging.set_verbosity(logging.WARNING)
  try:
    beam_sizes = [int(b) for b in FLAGS.beam_sizes]
  except ValueError:
    print("error: --beam_sizes takes integers, e.g. --beam_sizes=1,3,5.",
          file=sys.stderr)
    sys.exit(2)
  try:
    _gradio()  # Before the minutes of restoring, if it is missing.
    captioner = caption_lib.load_captioner(FLAGS.workdir, FLAGS.step,
                                           FLAGS.best)
    demo_model = DemoModel(captioner, beam_sizes)
    blocks = build(demo_model, FLAGS.workdir)
  except (checkpoint_lib.CheckpointError, errors.UserError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Serving the demo of {FLAGS.workdir} (step {captioner.step}) on "
        f"http://{FLAGS.host}:{FLAGS.port}; Ctrl-C stops it.", flush=True)
  try:
    launch(blocks, FLAGS.port, host=FLAGS.host,
           max_file_size=FLAGS.max_file_size)
  except OSError as e:
    print(f"error: cannot serve on {FLAGS.host}:{FLAGS.port} ({e}); pass "
          "another --port.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
