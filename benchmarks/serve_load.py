r"""Load on the captioning service (tools/serve.py) against one image at a time.

  python benchmarks/serve_load.py --model=EXPORT_DIR [--seconds=60] \
      [--clients=1,8,32] [--max_requests=20000] [--baseline_seconds=20] \
      [--max_batch=64] [--max_delay_ms=10]

EXPORT_DIR is what `visionspeak_jax.tools.export` wrote (the shapes model:
`python -m visionspeak_jax.tools.export --workdir=RUN --output=DIR`).

1. The baseline, in this process, as the caption scripts run: the SavedModel's
   `preprocess` signature and the `jax.export` module on one image per call
   (batch 1), after a warm-up, for `--baseline_seconds`: images/s and the
   median latency of one image.
2. The service as a subprocess on a free loopback port (127.0.0.1 only);
   once /healthz says ok, 1, 8 and 32 clients (threads, one keep-alive
   connection each) post one image per request (the raw PNG or JPEG body)
   for `--seconds` each, or until `--max_requests` requests, while a
   separate client sends a handful of bad uploads that must get 400.
   Per level: images/s, p50 and p99 latency, unexpected failures, the
   server's peak RSS (VmHWM) and whether its RSS stayed flat (sampled every
   second from /proc/PID/status: the mean of the last minute, or of the last
   third if shorter, within 5% of the mean of as long a window at the start).
3. The bars: at 32 clients, throughput >= 5x the baseline and p99 < 10x the
   baseline's one-image latency; no unexpected failure; memory flat.

The images are the shapes test split (TFDS `shapes_captions/default`, when
prepared), else shapes drawn with PIL. Clients, server and baseline share
the machine: on 2 cores the clients' own work is part of what is measured.
"""

import argparse
import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw

# `python benchmarks/serve_load.py` from a checkout: the package sits one
# level up. Appended, so an installed package or PYTHONPATH comes first.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(_ROOT)
# pylint: disable=g-import-not-at-top,wrong-import-position
from visionspeak_jax.platform import cpu_tuning
# pylint: enable=g-import-not-at-top,wrong-import-position

NUM_IMAGES = 32
FLAT_TOLERANCE = 0.05
THROUGHPUT_BAR = 5.0  # x the one-at-a-time rate, at 32 clients
LATENCY_BAR = 10.0  # x the one-image latency, for p99 at 32 clients


def _encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def load_images(n: int) -> tuple[list[tuple[bytes, str]], str]:
  """n (encoded image, content type), PNG and JPEG alternately; the source."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from visionspeak_jax.data.datasets import shapes  # pylint: disable=g-import-not-at-top,unused-import
    builder = tfds.builder("shapes_captions/default")
    dataset = tfds.as_numpy(builder.as_dataset(split="test").take(n))
    arrays = [ex["image"] for ex in dataset]
    source = "shapes_captions/default test split"
  except Exception:  # pylint: disable=broad-except
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(n):
      image = Image.new("RGB", (64, 64), (255, 255, 255))
      draw = ImageDraw.Draw(image)
      for _ in range(2):
        x, y, r = (int(v) for v in rng.integers(0, 32, 3) + [0, 0, 8])
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x, y, x + r, y + r], fill=colour)
      arrays.append(np.asarray(image))
    source = "shapes drawn with PIL (no prepared shapes_captions set)"
  images = []
  for i, array in enumerate(arrays):
    if i % 2:
      images.append((_encode(Image.fromarray(array), "JPEG"), "image/jpeg"))
    else:
      images.append((_encode(Image.fromarray(array), "PNG"), "image/png"))
  return images, source


def bad_uploads(png: bytes, jpeg: bytes) -> list[tuple[str, bytes, str]]:
  """(what, body, content type) of uploads that must get 400."""
  boundary = "b0undary"
  multipart = (
      f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
      "filename=\"ok.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
  multipart += png + (
      f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
      "filename=\"notes.txt\"\r\nContent-Type: text/plain\r\n\r\nhello"
      f"\r\n--{boundary}--\r\n").encode()
  return [
      ("empty body", b"", "image/png"),
      ("text body", b"not an image at all", "text/plain"),
      ("truncated PNG", png[:len(png) // 2], "image/png"),
      ("truncated JPEG", jpeg[:len(jpeg) // 2], "image/jpeg"),
      ("bad file among good ones", multipart,
       f"multipart/form-data; boundary={boundary}"),
  ]


# ---------------------------------------------------------------------------
# The baseline: one image per call in this process.


def baseline(model_dir: str, images: list[tuple[bytes, str]],
             seconds: float) -> dict[str, float]:
  """Preprocess + module at batch 1 in a loop, as the caption scripts do."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  preprocess = tf.saved_model.load(
      os.path.join(model_dir, "saved_model")).signatures["preprocess"]
  with open(os.path.join(model_dir, "captioner.jax"), "rb") as f:
    call = jax.jit(jax.export.deserialize(bytearray(f.read())).call)
  with open(os.path.join(model_dir, "vocab.json")) as f:
    words = json.load(f)["words"]

  def caption(data: bytes) -> str:
    pixels = preprocess(images=tf.constant([data]))["pixels"].numpy()
    tokens = jax.device_get(call(pixels))["tokens"][0]
    out = []
    for t in tokens.tolist():
      if t == 2:
        break
      if t > 1:
        out.append(words[t])
    return " ".join(out)

  for data, _ in images[:3]:  # Compiles, then first-call allocations.
    caption(data)
  times = []
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    t = time.perf_counter()
    caption(images[len(times) % len(images)][0])
    times.append(time.perf_counter() - t)
  total = time.perf_counter() - start
  return {"images": len(times), "seconds": total,
          "rate": len(times) / total,
          "latency_ms": float(np.median(times)) * 1e3,
          "example": caption(images[0][0])}


# ---------------------------------------------------------------------------
# The server and its clients.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 10):
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def _post(connection: http.client.HTTPConnection, body: bytes,
          content_type: str) -> tuple[int, bytes]:
  connection.request("POST", "/caption", body=body,
                     headers={"Content-Type": content_type})
  response = connection.getresponse()
  return response.status, response.read()


class Memory:
  """Samples a process's VmRSS and VmHWM (kB) every second."""

  def __init__(self, pid: int):
    self._path = f"/proc/{pid}/status"
    self.samples: list[tuple[float, int]] = []  # (time, VmRSS kB)
    self.peak_kb = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _read(self) -> tuple[int, int] | None:
    try:
      with open(self._path) as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
      return (int(fields["VmRSS"].split()[0]),
              int(fields["VmHWM"].split()[0]))
    except (OSError, KeyError, ValueError):
      return None

  def _run(self) -> None:
    while not self._stop.is_set():
      read = self._read()
      if read:
        self.samples.append((time.monotonic(), read[0]))
        self.peak_kb = max(self.peak_kb, read[1])
      self._stop.wait(1.0)

  def between(self, start: float, end: float) -> list[int]:
    return [rss for t, rss in self.samples if start <= t <= end]

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def flatness(rss: list[int]) -> tuple[float, bool] | None:
  """(relative change, flat?) of the last minute or third against the first."""
  if len(rss) < 3:
    return None
  window = max(1, min(60, len(rss) // 3))
  first = float(np.mean(rss[:window]))
  last = float(np.mean(rss[-window:]))
  change = (last - first) / first
  return change, abs(change) <= FLAT_TOLERANCE


def load_level(port: int, clients: int, images: list[tuple[bytes, str]],
               bad: list[tuple[str, bytes, str]], seconds: float,
               max_requests: int) -> dict[str, object]:
  """`clients` threads posting one image per request; the numbers."""
  latencies: list[list[float]] = [[] for _ in range(clients)]
  failures: list[str] = []
  sent = [0]
  lock = threading.Lock()
  start = time.monotonic()
  deadline = start + seconds

  def client(index: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = index
    try:
      while time.monotonic() < deadline:
        with lock:
          if sent[0] >= max_requests:
            return
          sent[0] += 1
        body, content_type = images[i % len(images)]
        i += clients
        t = time.perf_counter()
        try:
          status, answer = _post(connection, body, content_type)
        except (OSError, http.client.HTTPException) as e:
          failures.append(f"{type(e).__name__}: {e}")
          connection.close()
          connection = http.client.HTTPConnection("127.0.0.1", port,
                                                  timeout=120)
          continue
        if status == 200 and json.loads(answer)["captions"][0]["caption"]:
          latencies[index].append(time.perf_counter() - t)
        else:
          failures.append(f"{status}: {answer[:200]!r}")
    finally:
      connection.close()

  bad_results = []

  def bad_client() -> None:
    # Spread over the level, so they meet batches of good images.
    for k, (what, body, content_type) in enumerate(bad):
      time.sleep(min(seconds / (len(bad) + 1), 2.0) if k else 0.2)
      connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
      try:
        status, answer = _post(connection, body, content_type)
      except (OSError, http.client.HTTPException) as e:
        status, answer = None, str(e).encode()
      finally:
        connection.close()
      bad_results.append((what, status, answer))

  with concurrent.futures.ThreadPoolExecutor(clients + 1) as pool:
    futures = [pool.submit(client, i) for i in range(clients)]
    futures.append(pool.submit(bad_client))
    for future in futures:
      future.result()
  elapsed = time.monotonic() - start
  done = [t for per_client in latencies for t in per_client]
  return {
      "clients": clients, "seconds": elapsed, "start": start,
      "end": time.monotonic(), "images": len(done),
      "rate": len(done) / elapsed,
      "p50_ms": float(np.percentile(done, 50)) * 1e3 if done else float("nan"),
      "p99_ms": float(np.percentile(done, 99)) * 1e3 if done else float("nan"),
      "failures": failures,
      "bad_missed": [(w, s, a[:200]) for w, s, a in bad_results if s != 400],
      "bad_sent": len(bad_results),
  }


def start_server(model: str, port: int, log_path: str,
                 server_flags: list[str]) -> subprocess.Popen:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "visionspeak_jax.tools.serve",
         f"--model={model}", "--host=127.0.0.1", f"--port={port}",
         *server_flags], cwd=_ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen, port: int, log_path: str,
               timeout: float) -> float:
  start = time.monotonic()
  while time.monotonic() - start < timeout:
    if process.poll() is not None:
      with open(log_path) as f:
        raise SystemExit(f"The server exited with {process.returncode}:\n"
                         f"{f.read()[-3000:]}")
    try:
      if _get(port, "/healthz", timeout=5)[0] == 200:
        return time.monotonic() - start
    except OSError:
      pass
    time.sleep(0.25)
  process.kill()
  raise SystemExit(f"The server was not ready in {timeout:.0f} s.")


def _check(ok: bool) -> str:
  return "met" if ok else "MISSED"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True,
                      help="The export directory (tools/export.py --output).")
  parser.add_argument("--seconds", type=float, default=60.0,
                      help="Load time per concurrency level.")
  parser.add_argument("--max_requests", type=int, default=20000,
                      help="Requests per level at most.")
  parser.add_argument("--clients", default="1,8,32",
                      help="Concurrency levels, comma-separated.")
  parser.add_argument("--baseline_seconds", type=float, default=20.0,
                      help="Time of the one-image-at-a-time loop.")
  parser.add_argument("--max_batch", type=int, default=64)
  parser.add_argument("--max_delay_ms", type=float, default=10.0)
  parser.add_argument("--ready_timeout", type=float, default=600.0,
                      help="Seconds to wait for the server's warm-up.")
  args = parser.parse_args(argv)
  levels = [int(c) for c in args.clients.split(",") if c]
  started = time.monotonic()

  import jax  # pylint: disable=g-import-not-at-top
  print(f"CPU: {cpu_tuning.cpu_model()}, {os.cpu_count()} cores; "
        f"{cpu_tuning.cpu_flags_phrase()}")
  print(f"load average {os.getloadavg()[0]:.2f}; jax {jax.__version__} "
        f"({jax.default_backend()}, {jax.device_count()} devices); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  with open(os.path.join(args.model, "manifest.json")) as f:
    manifest = json.load(f)
  d = manifest["decoding"]
  print(f"model: {os.path.abspath(args.model)} (step "
        f"{manifest['run']['step']}, {manifest['input']['image_size']} px, "
        f"{manifest['grid'][0]}x{manifest['grid'][1]} regions, beam "
        f"{d['beam_size']}, at most {d['max_length']} tokens, "
        f"{d['decode_dtype']})")
  images, source = load_images(NUM_IMAGES)
  print(f"images: {len(images)} from the {source}, PNG and JPEG "
        f"alternately, {np.mean([len(b) for b, _ in images]):.0f} bytes on "
        "average")
  png = next(b for b, t in images if t == "image/png")
  jpeg = next(b for b, t in images if t == "image/jpeg")
  bad = bad_uploads(png, jpeg)

  base = baseline(args.model, images, args.baseline_seconds)
  print(f"\none image at a time (preprocess + module at batch 1, in this "
        f"process): {base['rate']:.1f} images/s, {base['latency_ms']:.1f} ms "
        f"per image (median of {base['images']} in {base['seconds']:.0f} s); "
        f"e.g. \"{base['example']}\"")

  port = _free_port()
  workdir = tempfile.mkdtemp(prefix="serve_load-")
  log_path = os.path.join(workdir, "server.log")
  server_flags = [f"--max_batch={args.max_batch}",
                  f"--max_delay_ms={args.max_delay_ms}",
                  f"--max_queue={max(512, 4 * max(levels))}"]
  process = start_server(args.model, port, log_path, server_flags)
  ready = wait_ready(process, port, log_path, args.ready_timeout)
  with open(log_path) as f:
    line = next((l.strip() for l in f if "Serving " in l), "")
  print(f"\nserver: pid {process.pid}, 127.0.0.1:{port}, "
        f"{' '.join(server_flags)}; ready after {ready:.1f} s")
  print(f"  {line}")
  memory = Memory(process.pid)
  results = []
  try:
    print(f"\n{'clients':>7s} {'images/s':>9s} {'x base':>7s} "
          f"{'p50 ms':>8s} {'p99 ms':>8s} {'failed':>6s} {'bad->400':>8s} "
          f"{'peak RSS':>9s} {'RSS change':>10s}")
    for clients in levels:
      r = load_level(port, clients, images, bad, args.seconds,
                     args.max_requests)
      flat = flatness(memory.between(r["start"], r["end"]))
      r["flat"] = flat
      r["peak_mb"] = memory.peak_kb / 1024
      results.append(r)
      change = (f"{flat[0]:+.1%} {'flat' if flat[1] else 'GROWS'}"
                if flat else "n/a")
      print(f"{clients:7d} {r['rate']:9.1f} {r['rate'] / base['rate']:7.1f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {len(r['failures']):6d} "
            f"{r['bad_sent'] - len(r['bad_missed'])}/{r['bad_sent']:<6d} "
            f"{r['peak_mb']:7.0f} MB {change:>10s}", flush=True)
      for failure in r["failures"][:3]:
        print(f"    failure: {failure}")
      for missed in r["bad_missed"]:
        print(f"    bad upload not refused with 400: {missed}")
    stats = _get(port, "/stats")[1]
  finally:
    memory.stop()
    process.send_signal(signal.SIGTERM)
    try:
      code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
      process.kill()
      code = "killed after 120 s"
  overall = flatness([rss for _, rss in memory.samples])
  print(f"\nserver: {stats['images']} images in {stats['batches']} batches "
        f"(largest {stats['largest_batch']}), buckets {stats['buckets']}, "
        f"compiles after warm-up {stats['compiles_after_warmup']}; exit "
        f"status after SIGTERM {code}; RSS over the whole run "
        + (f"{overall[0]:+.1%}" if overall else "n/a"))

  top = next((r for r in results if r["clients"] == 32), None)
  print("\nbars:")
  if top:
    ok = top["rate"] >= THROUGHPUT_BAR * base["rate"]
    print(f"  throughput at 32 clients >= {THROUGHPUT_BAR:g}x one at a time: "
          f"{top['rate']:.1f} vs {THROUGHPUT_BAR * base['rate']:.1f} images/s "
          f"({top['rate'] / base['rate']:.1f}x): {_check(ok)}")
    ok = top["p99_ms"] < LATENCY_BAR * base["latency_ms"]
    print(f"  p99 at 32 clients < {LATENCY_BAR:g}x one image's latency: "
          f"{top['p99_ms']:.1f} vs {LATENCY_BAR * base['latency_ms']:.1f} ms "
          f"({top['p99_ms'] / base['latency_ms']:.1f}x): {_check(ok)}")
  else:
    print("  (no 32-client level: the throughput and p99 bars are not "
          "checked)")
  failed = sum(len(r["failures"]) for r in results)
  missed = sum(len(r["bad_missed"]) for r in results)
  print(f"  no unexpected failure: {failed} failed requests, {missed} bad "
        f"uploads not refused with 400: {_check(failed == 0 and missed == 0)}")
  flat_ok = all(r["flat"] is None or r["flat"][1] for r in results)
  print("  memory flat (within 5% at every level): "
        + ", ".join(f"{r['clients']} clients "
                    + (f"{r['flat'][0]:+.1%}" if r["flat"] else "n/a")
                    for r in results) + f": {_check(flat_ok)}")
  print(f"\ntotal {time.monotonic() - started:.0f} s; server log {log_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
