"""The captioning service (tools/serve.py), run as its own process.

Each server is a fresh `python -m visionspeak_jax.tools.serve` on a free
loopback port, serving the tiny run's export. The servers share a JAX
compilation cache, so only the first one compiles its buckets.
"""

import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
from PIL import Image
from PIL import ImageDraw
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_READY_TIMEOUT_S = 180


# ---------------------------------------------------------------------------
# Images and HTTP.


def _drawing(seed: int, size: tuple[int, int]) -> Image.Image:
  """A few coloured shapes on a plain background, as the shapes set has."""
  rng = np.random.default_rng(seed)
  image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
  draw = ImageDraw.Draw(image)
  for _ in range(2):
    x, y = rng.integers(0, min(size) // 2, 2)
    r = int(rng.integers(5, min(size) // 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse([x, y, x + r, y + r], fill=colour)
    else:
      draw.rectangle([x, y, x + r, y + r], fill=colour)
  return image


def _encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


# name -> encoded bytes. The PNG and JPEG RGB files are read by
# `images.load_image` as the SavedModel decodes them; the GIF and the grey
# PNG only by the SavedModel.
_IMAGES = {
    "a.png": _encode(_drawing(0, (48, 40)), "PNG"),
    "b.jpg": _encode(_drawing(1, (64, 64)), "JPEG"),
    "c.png": _encode(_drawing(2, (30, 50)), "PNG"),
    "d.gif": _encode(_drawing(3, (40, 40)), "GIF"),
    "e.png": _encode(_drawing(4, (36, 36)).convert("L"), "PNG"),
}
_RGB_FILES = ("a.png", "b.jpg", "c.png")


def _multipart(files):
  """[(field, filename or None, bytes)] -> (body, content type)."""
  boundary = uuid.uuid4().hex
  body = b""
  for field, filename, data in files:
    disposition = f'form-data; name="{field}"'
    if filename is not None:
      disposition += f'; filename="{filename}"'
    body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
             "Content-Type: application/octet-stream\r\n\r\n").encode()
    body += data + b"\r\n"
  body += f"--{boundary}--\r\n".encode()
  return body, f"multipart/form-data; boundary={boundary}"


def _request(port, method, path, body=None, headers=None, timeout=120):
  """(status, JSON body) of one request on a new connection."""
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    connection.request(method, path, body=body, headers=headers or {},
                       encode_chunked=body is not None and not isinstance(
                           body, bytes))
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null")
  finally:
    connection.close()


def _post_raw(port, data, content_type="image/png", query=""):
  return _request(port, "POST", "/caption" + query, data,
                  {"Content-Type": content_type})


def _post_files(port, names, query=""):
  body, content_type = _multipart(
      [("image", name, _IMAGES[name]) for name in names])
  return _request(port, "POST", "/caption" + query, body,
                  {"Content-Type": content_type})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Server:
  """A serve.py process; `port` once /healthz answers 200."""

  def __init__(self, model, log_path, cache_dir, *flags, python_flags=()):
    self.port = _free_port()
    self.log_path = log_path
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
               PYTHONPATH=_ROOT)
    # conftest.py splits the CPU in two for the tests; a server is one
    # process on one device, as in production.
    env.pop("XLA_FLAGS", None)
    self._log = open(log_path, "w")
    self.process = subprocess.Popen(
        [sys.executable, *python_flags, "-m", "visionspeak_jax.tools.serve",
         f"--model={model}", f"--port={self.port}", *flags],
        cwd=_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

  def wait_ready(self) -> int:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise AssertionError(f"The server exited with {self.process.poll()}:"
                             f"\n{self.log()[-3000:]}")
      try:
        status, _ = _request(self.port, "GET", "/healthz", timeout=5)
        if status == 200:
          return self.port
      except OSError:
        pass
      time.sleep(0.2)
    raise AssertionError(f"The server was not ready in {_READY_TIMEOUT_S} s:"
                         f"\n{self.log()[-3000:]}")

  def stats(self):
    status, body = _request(self.port, "GET", "/stats")
    assert status == 200
    return body

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def close(self):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self._log.close()


# ---------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
  from visionspeak_jax.tools import export  # pylint: disable=g-import-not-at-top
  output = str(tmp_path_factory.mktemp("serve") / "export")
  export.export(tiny_run, output)
  return output


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def server(export_dir, cache_dir, tmp_path_factory):
  """The server most tests share; it logs every import (-X importtime)."""
  log = str(tmp_path_factory.mktemp("logs") / "server.log")
  process = _Server(export_dir, log, cache_dir, "--max_batch=2",
                    "--max_delay_ms=200", "--max_request_bytes=200000",
                    "--max_image_pixels=250000",
                    python_flags=("-X", "importtime"))
  yield process
  process.close()


@pytest.fixture(scope="module")
def port(server, reference):
  del reference  # Computed while the server warms up.
  return server.wait_ready()


@pytest.fixture(scope="module")
def reference(export_dir):
  """{name: (words, score, attention [T, h, w])} from the module itself.

  The pixels come from the SavedModel's `preprocess` signature one image
  at a time, as the server decodes them; the module runs once on them all.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  preprocess = tf.saved_model.load(
      os.path.join(export_dir, "saved_model")).signatures["preprocess"]
  names = sorted(_IMAGES)
  pixels = np.concatenate([
      preprocess(images=tf.constant([_IMAGES[n]]))["pixels"].numpy()
      for n in names])
  with open(os.path.join(export_dir, "captioner.jax"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  outputs = jax.device_get(exported.call(pixels))
  with open(os.path.join(export_dir, "vocab.json")) as f:
    words = json.load(f)["words"]
  result = {}
  for i, name in enumerate(names):
    kept, positions = [], []
    for t, token in enumerate(outputs["tokens"][i]):
      if token == 2:  # EOS
        break
      if token not in (0, 1):  # PAD, BOS
        kept.append(words[token])
        positions.append(t)
    result[name] = (kept, float(outputs["scores"][i]),
                    outputs["attention"][i][positions])
  return {"captions": result, "pixels": dict(zip(names, pixels))}


def _check(caption, expected, attention=False):
  words, score, maps = expected
  assert caption["words"] == words
  assert caption["caption"] == " ".join(words)
  np.testing.assert_allclose(caption["score"], score, rtol=1e-4, atol=1e-4)
  if attention:
    np.testing.assert_allclose(np.array(caption["attention"]).reshape(
        maps.shape), maps, atol=1e-5)
  else:
    assert "attention" not in caption


# ---------------------------------------------------------------------------
# Captions.


def test_health_and_metadata(port, export_dir):
  assert _request(port, "GET", "/healthz") == (200, {"status": "ok"})
  status, manifest = _request(port, "GET", "/metadata")
  assert status == 200
  with open(os.path.join(export_dir, "manifest.json")) as f:
    assert manifest == json.load(f)


def test_one_image_per_request_matches_the_module(port, reference):
  expected = reference["captions"]
  for name in sorted(_IMAGES):
    content_type = "image/jpeg" if name.endswith(".jpg") else "image/png"
    status, body = _post_raw(port, _IMAGES[name], content_type)
    assert status == 200, body
    (caption,) = body["captions"]
    _check(caption, expected[name])
    status, body = _post_files(port, [name], "?attention=true")
    assert status == 200, body
    _check(body["captions"][0], expected[name], attention=True)
  # Any other content type is a raw image too (curl --data-binary's default).
  status, body = _post_raw(port, _IMAGES["a.png"],
                           "application/x-www-form-urlencoded")
  assert status == 200
  _check(body["captions"][0], expected["a.png"])


def test_several_images_per_request_keep_their_order(port, reference):
  names = ["e.png", "a.png", "d.gif", "b.jpg", "c.png", "a.png"]
  status, body = _post_files(port, names, "?attention=1")
  assert status == 200, body
  assert len(body["captions"]) == len(names)
  for name, caption in zip(names, body["captions"]):
    _check(caption, reference["captions"][name], attention=True)


def test_captions_match_the_caption_tool(port, reference, tiny_run,
                                         export_dir, tmp_path):
  from visionspeak_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.tools import caption  # pylint: disable=g-import-not-at-top
  with open(os.path.join(export_dir, "manifest.json")) as f:
    manifest = json.load(f)
  size = manifest["input"]["image_size"]
  pixels = []
  for name in _RGB_FILES:
    path = tmp_path / name
    path.write_bytes(_IMAGES[name])
    pixels.append(images_lib.load_image(str(path), size))
    np.testing.assert_array_equal(pixels[-1], reference["pixels"][name])
  captioner = caption.load_captioner(tiny_run)
  expected = caption.caption_arrays(
      captioner, np.stack(pixels), beam_size=manifest["decoding"]["beam_size"],
      max_length=manifest["decoding"]["max_length"], batch_size=len(pixels))
  status, body = _post_files(port, _RGB_FILES, "?attention=true")
  assert status == 200, body
  for got, want in zip(body["captions"], expected):
    assert got["words"] == want.words
    np.testing.assert_allclose(got["score"], want.score, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(got["attention"]), want.alphas,
                               atol=1e-5)


def test_concurrent_requests_share_batches_without_compiling(
    port, server, reference):
  names = sorted(_IMAGES)[:4]
  barrier = threading.Barrier(len(names))

  def post(name):
    barrier.wait()
    return _post_raw(port, _IMAGES[name])

  before = server.stats()
  with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
    results = list(pool.map(post, names))
  for name, (status, body) in zip(names, results):
    assert status == 200, body
    _check(body["captions"][0], reference["captions"][name])
  after = server.stats()
  assert after["most_requests_in_a_batch"] > 1, after
  assert after["largest_batch"] > 1
  assert after["images"] - before["images"] == len(names)
  assert after["batches"] - before["batches"] < len(names)
  assert after["compiles_after_warmup"] == 0, after
  assert sum(after["buckets"].values()) == after["batches"]
  assert set(after["buckets"]) == {"1", "2"}


# ---------------------------------------------------------------------------
# Refusals.


_TRUNCATED_PNG = _IMAGES["a.png"][:len(_IMAGES["a.png"]) // 2]
_TRUNCATED_JPEG = _IMAGES["b.jpg"][:len(_IMAGES["b.jpg"]) // 2]
_BAD_REQUESTS = {
    # name: (body, content type, words the error names)
    "empty body": (b"", "image/png", "body is empty"),
    "text body": (b"a caption, not an image", "text/plain",
                  "body is not a readable image"),
    "truncated PNG": (_TRUNCATED_PNG, "image/png",
                      "body is not a readable image"),
    "truncated JPEG": (_TRUNCATED_JPEG, "image/jpeg",
                       "body is not a readable image"),
    "bad file among good ones": (
        *_multipart([("image", "a.png", _IMAGES["a.png"]),
                     ("image", "notes.txt", b"not an image"),
                     ("image", "b.jpg", _IMAGES["b.jpg"])]),
        'Upload 2 of 3 ("notes.txt") is not a readable image'),
    "empty file among good ones": (
        *_multipart([("image", "a.png", _IMAGES["a.png"]),
                     ("image", "empty.png", b"")]),
        'Upload 2 of 2 ("empty.png") is empty'),
    "text field": (*_multipart([("image", None, b"hello")]),
                   'Form field 1 of 1 ("image") is not a file'),
    "no file": (*_multipart([]), "holds no file"),
    "broken multipart": (b"--x\r\nnonsense", "multipart/form-data; boundary=y",
                         "cannot be parsed"),
}


def test_bad_uploads_get_400_and_spare_the_others(port, server, reference):
  good = ["a.png", "b.jpg", "c.png", "a.png"] * 2

  def post_good(name):
    return name, _post_raw(port, _IMAGES[name])

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    goods = [pool.submit(post_good, name) for name in good]
    for what, (body, content_type, words) in _BAD_REQUESTS.items():
      status, answer = _post_raw(port, body, content_type)
      assert status == 400, (what, answer)
      assert list(answer) == ["error"], what
      assert words in answer["error"], (what, answer)
      assert answer["error"].count(". ") == 0, answer  # One sentence.
    for future in goods:
      name, (status, answer) = future.result()
      assert status == 200, answer
      _check(answer["captions"][0], reference["captions"][name])
  assert server.stats()["compiles_after_warmup"] == 0
  assert _request(port, "GET", "/healthz")[0] == 200


def test_too_large_bodies_and_images_get_413(port):
  large = os.urandom(300_000)  # The server takes 200,000 bytes at most.
  status, answer = _post_raw(port, large, "image/png")
  assert status == 413, answer
  assert "larger than" in answer["error"]
  # Without Content-Length (chunked), the size is counted while reading.
  chunks = (large[i:i + 50_000] for i in range(0, len(large), 50_000))
  status, answer = _post_raw(port, chunks, "image/png")
  assert status == 413, answer
  body, content_type = _multipart([("image", f"{i}.bin", large[:60_000])
                                   for i in range(4)])
  status, answer = _request(port, "POST", "/caption", body,
                            {"Content-Type": content_type})
  assert status == 413, answer
  # 600 x 600 pixels, more than the 250,000 allowed, in a small file.
  big = _encode(Image.new("RGB", (600, 600), (9, 99, 199)), "PNG")
  assert len(big) < 10_000
  body, content_type = _multipart([("image", "a.png", _IMAGES["a.png"]),
                                   ("image", "big.png", big)])
  status, answer = _request(port, "POST", "/caption", body,
                            {"Content-Type": content_type})
  assert status == 413, answer
  assert answer["error"].startswith('Upload 2 of 2 ("big.png") is 600x600 ')
  assert _post_raw(port, _IMAGES["a.png"])[0] == 200


def test_the_server_imports_no_training_code(port, server):
  assert _post_raw(port, _IMAGES["b.jpg"], "image/jpeg")[0] == 200
  imported = set()
  for line in server.log().splitlines():
    if line.startswith("import time:") and "|" in line:
      imported.add(line.rsplit("|", 1)[1].strip())
  assert {"tensorflow", "jax", "fastapi", "visionspeak_jax.tools"} <= imported
  # `python -m` runs serve.py as __main__, so it is not listed itself.
  ours = {m for m in imported if m.split(".")[0] == "visionspeak_jax"}
  assert ours <= {"visionspeak_jax", "visionspeak_jax.tools",
                  "visionspeak_jax.tools.serve"}, ours


def test_a_full_queue_gets_503(export_dir, cache_dir, tmp_path):
  # One image waits up to 3 s for a second to fill its batch of 2; the
  # queue holds one, so every request meanwhile is refused.
  server = _Server(export_dir, str(tmp_path / "server.log"), cache_dir,
                   "--max_queue=1", "--max_batch=2", "--max_delay_ms=3000")
  try:
    port = server.wait_ready()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      first = pool.submit(_post_raw, port, _IMAGES["a.png"])
      deadline = time.monotonic() + 30
      while server.stats()["queued"] < 1:
        assert time.monotonic() < deadline and not first.done()
        time.sleep(0.05)
      for _ in range(3):
        status, answer = _post_raw(port, _IMAGES["b.jpg"], "image/jpeg")
        assert status == 503, answer
        assert "busy" in answer["error"]
      body, content_type = _multipart([("image", "a.png", _IMAGES["a.png"])]
                                      * 2)
      status, answer = _request(port, "POST", "/caption", body,
                                {"Content-Type": content_type})
      assert status == 413, answer  # Two images never fit a queue of one.
      assert not first.done()
      assert first.result(timeout=60)[0] == 200
    assert _post_raw(port, _IMAGES["b.jpg"], "image/jpeg")[0] == 200
    assert server.stats()["answered"] == {"200": 2, "413": 1, "503": 3}
  finally:
    server.close()


def test_sigterm_answers_the_requests_in_flight_then_exits_0(
    export_dir, cache_dir, tmp_path, reference):
  # Of three images, two fill a batch and one waits (up to 30 s) for a
  # second when the signal comes; it is still captioned, without the wait.
  server = _Server(export_dir, str(tmp_path / "server.log"), cache_dir,
                   "--max_batch=2", "--max_delay_ms=30000")
  try:
    port = server.wait_ready()
    names = ["a.png", "b.jpg", "c.png"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
      posts = [pool.submit(_post_raw, port, _IMAGES[n]) for n in names]
      deadline = time.monotonic() + 30
      while True:
        stats = server.stats()
        if stats["images"] + stats["queued"] == len(names):
          break
        assert time.monotonic() < deadline
        time.sleep(0.05)
      signalled = time.monotonic()
      server.process.send_signal(signal.SIGTERM)
      for name, post in zip(names, posts):
        status, answer = post.result(timeout=60)
        assert status == 200, answer
        _check(answer["captions"][0], reference["captions"][name])
      # The last did not wait out its 30 s.
      assert time.monotonic() - signalled < 15
    assert server.process.wait(timeout=60) == 0, server.log()[-3000:]
    log = server.log()
    assert "Stopped after 3 images in 2 batches." in log, log[-3000:]
    with pytest.raises(OSError):  # No longer listening.
      _request(port, "GET", "/healthz", timeout=5)
  finally:
    server.close()


# ---------------------------------------------------------------------------
# The service in this process, with a model that fails on demand.


def test_an_unexpected_error_gets_500_and_the_server_goes_on(
    export_dir, monkeypatch):
  from fastapi import testclient  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.tools import serve  # pylint: disable=g-import-not-at-top

  class FakeModel:
    image_size = 8
    fail = True

    def preprocess(self, data):
      del data
      return np.zeros((8, 8, 3), np.uint8)

    def run(self, images):
      if FakeModel.fail:
        FakeModel.fail = False
        raise RuntimeError("boom")
      b = len(images)
      return {"tokens": np.tile([[5, 6, 2, 0]], (b, 1)).astype(np.int32),
              "scores": np.full([b], -1.5, np.float32),
              "lengths": np.full([b], 2, np.int32),
              "attention": np.zeros([b, 4, 2, 2], np.float32)}

    def caption(self, *args):
      return serve.Model.caption(self, *args)

  def load(self):
    self.model = FakeModel()
    self.model.words = [f"w{i}" for i in range(10)]
    self.model._eos, self.model._skip = 2, (0, 1)  # pylint: disable=protected-access
    self.warmup_seconds = 0.0

  monkeypatch.setattr(serve.Service, "_load_and_warm_up", load)
  service = serve.Service(export_dir, serve.Limits(max_batch=2))
  with testclient.TestClient(serve.create_app(service)) as client:
    deadline = time.monotonic() + 30
    while client.get("/healthz").status_code != 200:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    png = _IMAGES["a.png"]
    response = client.post("/caption", content=png)
    assert response.status_code == 500
    assert response.json() == {
        "error": "Internal error (RuntimeError); the server logged it."}
    response = client.post("/caption", content=png)
    assert response.status_code == 200
    assert response.json() == {"captions": [
        {"caption": "w5 w6", "score": -1.5, "words": ["w5", "w6"]}]}
    assert service.stats_json()["answered"] == {"200": 1, "500": 1}
