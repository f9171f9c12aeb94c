r"""An HTTP captioning service for an exported captioner.

  python -m visionspeak_jax.tools.serve --model=EXPORT_DIR [--host=127.0.0.1] \
      [--port=8080] [--max_batch=64] [--max_delay_ms=10] [--max_queue=512] \
      [--max_request_bytes=33554432] [--max_image_pixels=40000000]

EXPORT_DIR is what `visionspeak_jax.tools.export` wrote. The service needs
neither the training code nor the checkpoint: each upload is decoded by the
SavedModel's `preprocess` signature and the model runs as the `jax.export`
module (`captioner.jax`). It imports nothing else of this package.

Endpoints:

- `POST /caption[?attention=true]`: one or more images, as
  multipart/form-data file fields (any number) or as the raw body (one
  image; Content-Type image/*, application/octet-stream or any other but
  multipart). Returns
  `{"captions": [{"caption", "score", "words"[, "attention"]}, ...]}` in
  upload order; `attention` holds one [h][w] map per word.
  `curl -F image=@photo.jpg http://127.0.0.1:8080/caption`
- `GET /healthz`: 200 once the model is warmed up; 503 while warming up or
  shutting down.
- `GET /metadata`: the export's manifest.
- `GET /stats`: batches run, images, the bucket histogram, the largest
  batch, and XLA compilations during and after the warm-up.

Images from concurrent requests are batched: one worker collects queued
images until `--max_batch` are waiting or `--max_delay_ms` passed since the
first, pads the batch with zero images to the next bucket (powers of two up
to `--max_batch`) and runs the module in its own thread. Every bucket is
compiled at start-up, so nothing compiles while serving.

Refusals are JSON `{"error": "<one sentence>"}`: 400 for an upload that is
empty, not an image, truncated or corrupt (naming which; the request's other
images are not captioned, other requests are unaffected), 413 for a body over
`--max_request_bytes` or an image over `--max_image_pixels`, 503 while the
queue holds `--max_queue` images, while warming up or shutting down, 500 for
anything unexpected (the server goes on serving).

SIGTERM (or Ctrl+C): stops accepting, answers every request already
received (queued images are still batched), then exits with status 0.
Exit status 2: EXPORT_DIR is not a usable export; 1: the warm-up failed.
"""

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, AsyncIterator, Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# pylint: disable=g-import-not-at-top,wrong-import-position
import fastapi
import jax
import numpy as np
from PIL import Image
from starlette import formparsers
from starlette import requests as starlette_requests
from starlette.datastructures import UploadFile
import tensorflow as tf
import uvicorn
# pylint: enable=g-import-not-at-top,wrong-import-position

logger = logging.getLogger("visionspeak_jax.serve")

# The export's layout (tools/export.py writes it; not imported from there so
# that the service runs without the training code).
MODULE_FILE = "captioner.jax"
SAVED_MODEL_DIR = "saved_model"
VOCAB_FILE = "vocab.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_DELAY_MS = 10.0
DEFAULT_MAX_QUEUE = 512
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# How long SIGTERM waits for requests in flight before cancelling them.
GRACEFUL_SHUTDOWN_S = 60
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_FORMATS = "JPEG, PNG, GIF, BMP or WebP"


class ExportDirError(Exception):
  """The model directory is not a usable export; the message says why."""


class Refusal(Exception):
  """A request the service answers with `status` and one sentence."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the service accepts; see the flags of the same names."""
  max_batch: int = DEFAULT_MAX_BATCH
  max_delay_ms: float = DEFAULT_MAX_DELAY_MS
  max_queue: int = DEFAULT_MAX_QUEUE
  max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def buckets(max_batch: int) -> tuple[int, ...]:
  """The batch sizes compiled: powers of two below `max_batch`, and it."""
  sizes = []
  size = 1
  while size < max_batch:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (max_batch,)


def _mib(n: int) -> str:
  return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n} bytes"


# ---------------------------------------------------------------------------
# The model: the export's preprocessing and module, nothing else.


def read_manifest(model_dir: str) -> dict[str, Any]:
  """The export's manifest, after checking that its files are there.

  Raises:
    ExportDirError: a file is missing or the manifest is not one this
      service reads.
  """
  if not os.path.isdir(model_dir):
    raise ExportDirError(f"{model_dir} is not a directory: pass the --output "
                         "of visionspeak_jax.tools.export as --model.")
  for name in (MANIFEST_FILE, MODULE_FILE, VOCAB_FILE, SAVED_MODEL_DIR):
    if not os.path.exists(os.path.join(model_dir, name)):
      raise ExportDirError(f"{model_dir} has no {name}: pass the --output of "
                           "visionspeak_jax.tools.export as --model.")
  try:
    with open(os.path.join(model_dir, MANIFEST_FILE)) as f:
      manifest = json.load(f)
    int(manifest["input"]["image_size"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ExportDirError(f"{model_dir}/{MANIFEST_FILE} is unreadable ({e}): "
                         "export the model again.") from e
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportDirError(f"{model_dir} is export format {version}; this "
                         f"service reads format {FORMAT_VERSION}: export the "
                         "model again with this version.")
  return manifest


class Model:
  """An export's preprocessing, module and vocabulary.

  `preprocess` may be called from any thread; `run` from one at a time.
  """

  def __init__(self, model_dir: str, manifest: dict[str, Any]):
    self.model_dir = model_dir
    self.manifest = manifest
    self.image_size = int(manifest["input"]["image_size"])
    with open(os.path.join(model_dir, VOCAB_FILE)) as f:
      self.words = list(json.load(f)["words"])
    special = manifest.get("special_ids", {})
    self._eos = special.get("eos", 2)
    self._skip = (special.get("pad", 0), special.get("bos", 1))
    try:
      tf.config.set_visible_devices([], "GPU")  # The accelerators are JAX's.
    except RuntimeError:
      pass  # TensorFlow was initialised already.
    saved = tf.saved_model.load(os.path.join(model_dir, SAVED_MODEL_DIR))
    self._saved_model = saved  # The signature needs its variables alive.
    self._preprocess = saved.signatures["preprocess"]
    with open(os.path.join(model_dir, MODULE_FILE), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    self._call = jax.jit(exported.call)

  def preprocess(self, data: bytes) -> np.ndarray:
    """One encoded image -> uint8 [S, S, 3], as the export decodes it.

    Raises:
      tf.errors.InvalidArgumentError: `data` is empty, not an image, or
        truncated or corrupt.
    """
    with tf.device("/CPU:0"):
      pixels = self._preprocess(images=tf.constant([data]))["pixels"]
    return pixels.numpy()[0]

  def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 [b, S, S, 3] -> the module's outputs as numpy arrays."""
    return jax.device_get(self._call(images))

  def caption(self, tokens: np.ndarray, score: float, attention: np.ndarray,
              with_attention: bool) -> dict[str, Any]:
    """One image's outputs -> its JSON object (words up to EOS)."""
    words, positions = [], []
    for t, i in enumerate(tokens.tolist()):
      if i == self._eos:
        break
      if i in self._skip:
        continue
      words.append(self.words[i] if 0 <= i < len(self.words) else "<unk>")
      positions.append(t)
    result = {"caption": " ".join(words), "score": float(score),
              "words": words}
    if with_attention:
      result["attention"] = attention[positions].tolist()  # [T, h, w]
    return result


class CompileCounter:
  """Counts XLA compilations in this process, from any thread."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()
    jax.monitoring.register_event_duration_secs_listener(self._listener)

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == _COMPILE_EVENT:
      with self._lock:
        self.count += 1

  def close(self) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)


# ---------------------------------------------------------------------------
# Dynamic batching.


@dataclasses.dataclass
class _Item:
  pixels: np.ndarray  # uint8 [S, S, 3]
  future: asyncio.Future
  arrival: float  # time.monotonic() when queued
  request: int  # Which request it came from (for the statistics).


class Batcher:
  """Collects images from concurrent requests into batches for the model.

  One asyncio task takes up to `max_batch` queued images, or fewer once
  `max_delay_ms` passed since the oldest arrived, and runs them in one
  thread (off the event loop). Every future of a batch is resolved with
  its image's row of the outputs, or with the batch's exception.
  """

  def __init__(self, run: Callable[[list[np.ndarray]], tuple[int, Any]],
               limits: Limits, stats: "Stats"):
    self._run = run
    self._limits = limits
    self._stats = stats
    self._queue: collections.deque[_Item] = collections.deque()
    self._wake = asyncio.Event()
    self._stopping = False
    self._hurry = False  # Shutting down: run what is queued without delay.
    self._task: asyncio.Task | None = None
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="model")
    self._requests = 0

  @property
  def queued(self) -> int:
    return len(self._queue)

  def start(self) -> None:
    self._task = asyncio.get_running_loop().create_task(self._work())

  def check_room(self, n: int) -> None:
    """Refuses `n` more images when the queue has no room for them all.

    Raises:
      Refusal: 503, the queue is full.
    """
    if len(self._queue) + n > self._limits.max_queue:
      raise Refusal(503, f"The server is busy ({len(self._queue)} images "
                    f"queued, at most {self._limits.max_queue}): retry "
                    "shortly.")

  def submit(self, images: Sequence[np.ndarray]) -> list[asyncio.Future]:
    """Queues one request's images; returns a future per image.

    Raises:
      Refusal: 503, the queue has no room for them all.
    """
    self.check_room(len(images))
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    self._requests += 1
    futures = []
    for pixels in images:
      future = loop.create_future()
      self._queue.append(_Item(pixels, future, now, self._requests))
      futures.append(future)
    self._wake.set()
    return futures

  def hurry(self) -> None:
    """From now on runs queued images without waiting for more."""
    self._hurry = True
    self._wake.set()

  async def drain(self) -> None:
    """Runs what is queued, then stops the worker."""
    self._stopping = self._hurry = True
    self._wake.set()
    if self._task is not None:
      await self._task
    self._executor.shutdown(wait=True)

  async def _wait(self, timeout: float | None) -> None:
    self._wake.clear()
    if timeout is None:
      await self._wake.wait()
    else:
      with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(self._wake.wait(), timeout)

  async def _work(self) -> None:
    limits = self._limits
    while True:
      while not self._queue:
        if self._stopping:
          return
        await self._wait(None)
      deadline = self._queue[0].arrival + limits.max_delay_ms / 1000
      while len(self._queue) < limits.max_batch and not self._hurry:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        await self._wait(remaining)
      n = min(len(self._queue), limits.max_batch)
      items = [self._queue.popleft() for _ in range(n)]
      try:
        await self._run_items(items)
      except Exception as e:  # pylint: disable=broad-except
        # The worker must survive anything, or every later request hangs.
        logger.exception("A batch of %d images failed.", len(items))
        for item in items:
          if not item.future.done():
            item.future.set_exception(e)

  async def _run_items(self, items: list[_Item]) -> None:
    loop = asyncio.get_running_loop()
    bucket, outputs = await loop.run_in_executor(
        self._executor, self._run, [item.pixels for item in items])
    self._stats.batch(bucket, len(items), len({i.request for i in items}))
    for i, item in enumerate(items):
      if not item.future.done():  # Not cancelled by a vanished client.
        item.future.set_result({k: v[i] for k, v in outputs.items()})


class Stats:
  """What `/stats` reports; changed on the event loop only."""

  def __init__(self, bucket_sizes: Sequence[int]):
    self.batches = 0
    self.images = 0
    self.padding = 0
    self.histogram = {b: 0 for b in bucket_sizes}
    self.largest_batch = 0
    self.most_requests_in_a_batch = 0
    self.answered = collections.Counter()

  def batch(self, bucket: int, images: int, requests: int) -> None:
    self.batches += 1
    self.images += images
    self.padding += bucket - images
    self.histogram[bucket] += 1
    self.largest_batch = max(self.largest_batch, images)
    self.most_requests_in_a_batch = max(self.most_requests_in_a_batch,
                                        requests)


# ---------------------------------------------------------------------------
# The service: the model, the batcher and the state of the process.


class Service:
  """Loads and warms up the model, queues uploads, keeps the statistics."""

  def __init__(self, model_dir: str, limits: Limits,
               manifest: dict[str, Any] | None = None,
               on_fatal: Callable[[], None] | None = None):
    self.model_dir = os.path.abspath(model_dir)
    self.limits = limits
    self.manifest = manifest or read_manifest(model_dir)
    self.buckets = buckets(limits.max_batch)
    self.stats = Stats(self.buckets)
    self.model: Model | None = None
    self.ready = False
    self.draining = False
    self.failed = False
    self.warmup_seconds: float | None = None
    self.warmup_compiles = 0
    self.in_flight = 0  # /caption requests being answered.
    self._compiles: CompileCounter | None = None
    self._on_fatal = on_fatal or (lambda: None)
    self._batcher: Batcher | None = None
    self._loop: asyncio.AbstractEventLoop | None = None
    self._warmup: asyncio.Future | None = None
    self._decoders = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(2, os.cpu_count() or 1),
        thread_name_prefix="decode")

  # Life cycle.

  async def start(self) -> None:
    """Starts the batcher and, in a thread, the loading and warm-up."""
    self._compiles = CompileCounter()
    self._batcher = Batcher(self._run_batch, self.limits, self.stats)
    self._batcher.start()
    loop = self._loop = asyncio.get_running_loop()
    self._warmup = loop.run_in_executor(None, self._load_and_warm_up)
    self._warmup.add_done_callback(self._warmed_up)

  def _load_and_warm_up(self) -> None:
    start = time.perf_counter()
    self.model = Model(self.model_dir, self.manifest)
    size = self.model.image_size
    for bucket in self.buckets:
      t = time.perf_counter()
      self.model.run(np.zeros((bucket, size, size, 3), np.uint8))
      logger.debug("Bucket %d compiled in %.1f s.", bucket,
                   time.perf_counter() - t)
    self.warmup_seconds = time.perf_counter() - start
    self.warmup_compiles = self._compiles.count

  def _warmed_up(self, future: asyncio.Future) -> None:
    if future.cancelled() or future.exception() is not None:
      self.failed = True
      logger.error("Loading %s failed: %r", self.model_dir,
                   None if future.cancelled() else future.exception(),
                   exc_info=None if future.cancelled() else
                   future.exception())
      self._on_fatal()
      return
    self.ready = True
    decoding = self.manifest.get("decoding", {})
    logger.info(
        "Serving %s (step %s, %d px images, beam %s, at most %s tokens): "
        "buckets %s warmed up in %.1f s (%d compiles); batches of at most "
        "%d images after %g ms, queue %d images.", self.model_dir,
        self.manifest.get("run", {}).get("step"), self.model.image_size,
        decoding.get("beam_size"), decoding.get("max_length"),
        ",".join(map(str, self.buckets)), self.warmup_seconds,
        self.warmup_compiles, self.limits.max_batch,
        self.limits.max_delay_ms, self.limits.max_queue)

  def begin_drain(self) -> None:
    """From now on refuse new work; what was received is still answered.

    Safe to call from a signal handler.
    """
    if not self.draining:
      logger.info("Shutting down: answering the %d requests in flight.",
                  self.in_flight)
    self.draining = True
    if self._loop is not None and self._batcher is not None:
      self._loop.call_soon_threadsafe(self._batcher.hurry)

  async def stop(self) -> None:
    self.begin_drain()
    if self._batcher is not None:
      await self._batcher.drain()
    self._decoders.shutdown(wait=True)
    if self._compiles is not None:
      self._compiles.close()
    logger.info("Stopped after %d images in %d batches.", self.stats.images,
                self.stats.batches)

  # Requests.

  def _run_batch(self, images: list[np.ndarray]) -> tuple[int, Any]:
    n = len(images)
    bucket = next(b for b in self.buckets if b >= n)
    batch = np.zeros((bucket,) + images[0].shape, np.uint8)
    batch[:n] = np.stack(images)
    return bucket, self.model.run(batch)

  def check_open(self) -> None:
    if self.draining:
      raise Refusal(503, "The server is shutting down: send the request to "
                    "another instance.")
    if not self.ready:
      raise Refusal(503, "The model is still warming up: retry in a few "
                    "seconds.")

  def check_room(self, n: int) -> None:
    if n > self.limits.max_queue:
      raise Refusal(413, f"The request holds {n} images, more than the "
                    f"{self.limits.max_queue} this server queues at most: "
                    "send fewer per request.")
    self._batcher.check_room(n)

  def _decode(self, uploads: Sequence[tuple[str, bytes]]
              ) -> list[np.ndarray]:
    """Each upload -> pixels, one at a time (runs in a decoding thread)."""
    pixels = []
    for name, data in uploads:
      if not data:
        raise Refusal(400, f"{name} is empty: send an image file "
                      f"({_FORMATS}).")
      check_pixels(name, data, self.limits.max_image_pixels)
      try:
        pixels.append(self.model.preprocess(data))
      except tf.errors.InvalidArgumentError as e:
        raise _unreadable(name) from e
    return pixels

  async def caption(self, uploads: Sequence[tuple[str, bytes]],
                    with_attention: bool) -> list[dict[str, Any]]:
    """Captions one request's uploads, in order.

    Raises:
      Refusal: a bad upload (400), too many pixels (413), a full queue
        (503).
    """
    self.check_room(len(uploads))
    loop = asyncio.get_running_loop()
    pixels = await loop.run_in_executor(self._decoders, self._decode,
                                        uploads)
    futures = self._batcher.submit(pixels)
    outputs = await asyncio.gather(*futures)
    return [self.model.caption(o["tokens"], o["scores"], o["attention"],
                               with_attention) for o in outputs]

  def stats_json(self) -> dict[str, Any]:
    s = self.stats
    compiles = self._compiles.count if self._compiles else 0
    return {
        "ready": self.ready, "draining": self.draining,
        "batches": s.batches, "images": s.images,
        "padding_images": s.padding,
        "buckets": {str(b): n for b, n in s.histogram.items()},
        "largest_batch": s.largest_batch,
        "most_requests_in_a_batch": s.most_requests_in_a_batch,
        "queued": self._batcher.queued if self._batcher else 0,
        "in_flight": self.in_flight,
        "answered": {str(k): v for k, v in sorted(s.answered.items())},
        "warmup_seconds": self.warmup_seconds,
        "compiles_during_warmup": self.warmup_compiles,
        "compiles_after_warmup": (compiles - self.warmup_compiles
                                  if self.ready else 0),
        "limits": dataclasses.asdict(self.limits),
    }


def _unreadable(name: str) -> Refusal:
  return Refusal(400, f"{name} is not a readable image: it is not "
                 f"{_FORMATS}, or it is truncated or corrupt.")


def check_pixels(name: str, data: bytes, limit: int) -> None:
  """Refuses an image whose header says it has over `limit` pixels.

  Only the header is read (PIL opens lazily), so this costs nothing like a
  decode.

  Raises:
    Refusal: 413 for too many pixels; 400 when no image header is found.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
  except Image.DecompressionBombError as e:
    raise Refusal(413, f"{name} has more pixels than PIL opens safely, "
                  f"far more than this server's limit of {limit}: downscale "
                  "it.") from e
  except Exception as e:  # pylint: disable=broad-except
    # PIL reads the header of every format TensorFlow decodes; the
    # exception type depends on the format and the damage.
    raise _unreadable(name) from e
  if width * height > limit:
    raise Refusal(413, f"{name} is {width}x{height} = {width * height} "
                  f"pixels, more than this server's limit of {limit}: "
                  "downscale it.")


# ---------------------------------------------------------------------------
# HTTP.


def _error(status: int, message: str) -> fastapi.responses.JSONResponse:
  headers = {"Retry-After": "1"} if status == 503 else None
  return fastapi.responses.JSONResponse({"error": message}, status_code=status,
                                        headers=headers)


async def _bounded_stream(request: fastapi.Request, limit: int
                          ) -> AsyncIterator[bytes]:
  """The request body in chunks, refused (413) once over `limit` bytes."""
  too_large = Refusal(413, f"The request body is larger than {_mib(limit)}, "
                      "this server's limit: send fewer or smaller images.")
  declared = request.headers.get("content-length")
  if declared is not None:
    if not declared.isdigit():
      raise Refusal(400, "The Content-Length header is not a number.")
    if int(declared) > limit:
      raise too_large
  total = 0
  async for chunk in request.stream():
    total += len(chunk)
    if total > limit:
      raise too_large
    yield chunk


async def read_uploads(request: fastapi.Request, limits: Limits
                       ) -> list[tuple[str, bytes]]:
  """The request's images as (name for messages, bytes), in order.

  A multipart/form-data body gives one image per file field; any other body
  is one image.

  Raises:
    Refusal: 413 over `max_request_bytes`; 400 for a multipart body that
      cannot be parsed, holds a non-file field or no file.
  """
  content_type = request.headers.get("content-type", "")
  stream = _bounded_stream(request, limits.max_request_bytes)
  if not content_type.lower().startswith("multipart/form-data"):
    return [("The request body", b"".join([c async for c in stream]))]
  parser = formparsers.MultiPartParser(
      request.headers, stream, max_files=limits.max_queue, max_fields=100)
  try:
    form = await parser.parse()
  except formparsers.MultiPartException as e:
    if str(e).startswith("Too many files"):
      raise Refusal(413, "The request holds more images than the "
                    f"{limits.max_queue} this server queues at most: send "
                    "fewer per request.") from e
    raise Refusal(400, f"The multipart/form-data body cannot be parsed "
                  f"({str(e).rstrip('.')}).") from e
  uploads = []
  try:
    items = form.multi_items()
    for index, (field, value) in enumerate(items, start=1):
      if not isinstance(value, UploadFile):
        raise Refusal(400, f'Form field {index} of {len(items)} ("{field}") '
                      "is not a file: send each image as a file field "
                      "(curl -F image=@photo.jpg).")
      name = f'Upload {index} of {len(items)} ("{value.filename or field}")'
      uploads.append((name, await value.read()))
  finally:
    await form.close()
  if not uploads:
    raise Refusal(400, "The multipart/form-data body holds no file: send "
                  "each image as a file field (curl -F image=@photo.jpg).")
  return uploads


def create_app(service: Service) -> fastapi.FastAPI:
  """The FastAPI app of `service`; its lifespan starts and drains it."""

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    await service.start()
    try:
      yield
    finally:
      await service.stop()

  app = fastapi.FastAPI(title="VisionSpeak-JAX captioner", lifespan=lifespan,
                        docs_url=None, redoc_url=None)

  @app.exception_handler(Exception)
  async def unexpected(request, exc):  # pylint: disable=unused-variable
    del request
    logger.error("Unexpected error: %r", exc, exc_info=exc)
    return _error(500, f"Internal error ({type(exc).__name__}); the server "
                  "logged it.")

  @app.post("/caption")
  async def caption(request: fastapi.Request,  # pylint: disable=unused-variable
                    attention: bool = False):
    service.in_flight += 1
    try:
      service.check_open()
      uploads = await read_uploads(request, service.limits)
      captions = await service.caption(uploads, attention)
      response = fastapi.responses.JSONResponse({"captions": captions})
    except Refusal as e:
      response = _error(e.status, e.message)
    except starlette_requests.ClientDisconnect:
      response = _error(400, "The client disconnected.")  # Read by nobody.
    except Exception as e:  # pylint: disable=broad-except
      logger.exception("Unexpected error while captioning.")
      response = _error(500, f"Internal error ({type(e).__name__}); the "
                        "server logged it.")
    finally:
      service.in_flight -= 1
    service.stats.answered[response.status_code] += 1
    return response

  @app.get("/healthz")
  async def healthz():  # pylint: disable=unused-variable
    if service.failed:
      return fastapi.responses.JSONResponse({"status": "failed"}, 503)
    if service.draining:
      return fastapi.responses.JSONResponse({"status": "draining"}, 503)
    if not service.ready:
      return fastapi.responses.JSONResponse({"status": "warming up"}, 503)
    return {"status": "ok"}

  @app.get("/metadata")
  async def metadata():  # pylint: disable=unused-variable
    return service.manifest

  @app.get("/stats")
  async def stats():  # pylint: disable=unused-variable
    return service.stats_json()

  return app


class _Server(uvicorn.Server):
  """uvicorn's server, telling the service when a signal asks it to stop.

  uvicorn stops listening, waits for the connections in flight and then
  runs the app's lifespan shutdown, which drains the batcher. It would then
  raise SIGTERM again to die by it; a drained service exits with 0 instead.
  """

  def __init__(self, config: uvicorn.Config, service: Service):
    super().__init__(config)
    self._service = service

  def handle_exit(self, sig, frame):
    self._service.begin_drain()
    super().handle_exit(sig, frame)
    if sig == signal.SIGTERM:
      self._captured_signals = [s for s in self._captured_signals
                                if s != signal.SIGTERM]


# ---------------------------------------------------------------------------
# The command line.


def _positive(kind):
  def parse(text):
    value = kind(text)
    if value <= 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
  return parse


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m visionspeak_jax.tools.serve",
      description="Serves an exported captioner over HTTP.")
  parser.add_argument("--model", required=True,
                      help="The directory visionspeak_jax.tools.export wrote.")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Address to listen on (0.0.0.0: every interface).")
  parser.add_argument("--port", type=int, default=8080)
  parser.add_argument("--max_batch", type=_positive(int),
                      default=DEFAULT_MAX_BATCH,
                      help="Images per model call at most.")
  parser.add_argument("--max_delay_ms", type=float,
                      default=DEFAULT_MAX_DELAY_MS,
                      help="How long the first queued image waits for others "
                      "to join its batch.")
  parser.add_argument("--max_queue", type=_positive(int),
                      default=DEFAULT_MAX_QUEUE,
                      help="Images waiting for the model at most; beyond, "
                      "requests get 503.")
  parser.add_argument("--max_request_bytes", type=_positive(int),
                      default=DEFAULT_MAX_REQUEST_BYTES,
                      help="Request body size at most; beyond, 413.")
  parser.add_argument("--max_image_pixels", type=_positive(int),
                      default=DEFAULT_MAX_IMAGE_PIXELS,
                      help="Width x height of an upload at most; beyond, "
                      "413.")
  parser.add_argument("--log_level", default="info",
                      choices=["debug", "info", "warning", "error"])
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the service until SIGTERM; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.max_delay_ms < 0:
    parser.error("--max_delay_ms must be >= 0.")
  logging.basicConfig(
      level=args.log_level.upper(),
      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if args.log_level != "debug":  # Its backend probing is noise here.
    logging.getLogger("jax").setLevel(logging.WARNING)
  try:
    manifest = read_manifest(args.model)
  except ExportDirError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  limits = Limits(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                  max_queue=args.max_queue,
                  max_request_bytes=args.max_request_bytes,
                  max_image_pixels=args.max_image_pixels)
  holder = {}

  def on_fatal():
    holder["server"].should_exit = True

  service = Service(args.model, limits, manifest=manifest, on_fatal=on_fatal)
  config = uvicorn.Config(
      create_app(service), host=args.host, port=args.port,
      log_level=args.log_level, access_log=False, lifespan="on",
      timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
  server = holder["server"] = _Server(config, service)
  try:
    server.run()
  except KeyboardInterrupt:
    return 130
  return 1 if service.failed or not server.started else 0


if __name__ == "__main__":
  sys.exit(main())
