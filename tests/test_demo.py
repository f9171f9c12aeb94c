"""The web demo in a real browser: Debian's chromium, driven by selenium.

A run is trained for the module on the `tiny` shapes set long enough to
caption its training images right (about a minute on two cores), served on a
free local port, and the page is used as a person would: upload, read the
caption, click a word, upload a broken file.

Outside CI a missing chromium, chromedriver, Gradio or selenium skips these
tests; in CI (`CI` set, as `.ci/run` does) it fails them: `.ci/run`
installs all four.

Screenshots go to $VISIONSPEAK_TEST_ARTIFACTS (default: the test's tmp_path);
their paths are printed (pytest -s shows them).
"""

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from configs import tiny
from visionspeak_jax.data.datasets import shapes
from visionspeak_jax.tools import caption
from visionspeak_jax.tools import demo

pytestmark = pytest.mark.slow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A training image of the fixture's run with one large object: 600 steps on
# 200 images caption every single-object training image right (75 of 75),
# but only half of the unseen ones, so the test shows a seen one.
_IMAGE_INDEX = 0
_TIMEOUT = 60  # Seconds to wait for the page.
_MAX_UPLOAD_MB = 1  # The test server's upload limit (the default is 20).


def _require(what: str, found: bool) -> None:
  """Skips (outside CI) or fails (in CI) when `what` is missing."""
  if found:
    return
  message = (f"{what} is missing; bash .ci/run installs it (or: apt-get "
             "install chromium chromium-driver; pip install -e "
             "'.[test,demo]').")
  if os.environ.get("CI"):
    pytest.fail(f"In CI the browser test must run: {message}")
  pytest.skip(message)


def _module(name: str):
  try:
    return importlib.import_module(name)
  except ImportError:
    _require(f"The Python package {name}", False)


def _browser_paths() -> tuple[str, str]:
  """(chromium, chromedriver) executables."""
  browser = next((p for p in map(shutil.which, ("chromium",
                                                "chromium-browser"))
                  if p), None)
  _require("Debian's chromium", browser is not None)
  driver = shutil.which("chromedriver")
  _require("chromium-driver (chromedriver)", driver is not None)
  return browser, driver


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir, tmp_path_factory):
  """A tiny-set run that captions its single-object training images."""
  _browser_paths()  # No minute of training when the test will not run.
  _module("gradio")
  _module("selenium")
  from visionspeak_jax import train
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  # Measured on two cores: 64 px (the shapes run's size; at 32 px shapes
  # are confused) and 600 steps learn every single-object training image.
  config.image_size = 64
  config.model.resnet_width = 16
  config.model.embed_dim = 64
  config.model.attention_dim = 64
  config.model.hidden_dim = 128
  config.model.position_embedding = True
  config.alpha_c = 0.01  # As configs/shapes.py, whose comment says why.
  config.batch_size = 32
  config.eval_batch_size = 16
  config.num_train_steps = 600
  config.learning_rate = 3e-3
  config.warmup_steps = 60
  config.log_every_steps = 200
  config.eval_every_steps = 600
  config.checkpoint_every_steps = 600
  config.cache_train_images = True
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  start = time.time()
  train.train_and_evaluate(config, workdir)
  print(f"\ntest_demo: trained the demo's run in {time.time() - start:.0f} s")
  return workdir


@pytest.fixture(scope="module")
def server(run_dir):
  """The demo served on a free local port: (url, DemoModel)."""
  demo_model = demo.DemoModel(caption.load_captioner(run_dir),
                              beam_sizes=(1, 3))
  blocks = demo.build(demo_model, run_dir)
  url = demo.launch(blocks, demo.free_port(), block=False,
                    max_file_size=f"{_MAX_UPLOAD_MB}mb")
  yield url, demo_model
  blocks.close()


@pytest.fixture
def browser():
  browser_path, driver_path = _browser_paths()
  webdriver = _module("selenium.webdriver")
  options = webdriver.ChromeOptions()
  options.binary_location = browser_path
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--window-size=1400,1500"):
    options.add_argument(arg)
  # Every request the page makes, to check that none leaves this machine.
  options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
  driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path),
                            options=options)
  yield driver
  driver.quit()


@pytest.fixture
def artifacts(tmp_path):
  directory = os.environ.get("VISIONSPEAK_TEST_ARTIFACTS") or str(tmp_path)
  os.makedirs(directory, exist_ok=True)
  return directory


def _shapes_image(directory: str) -> tuple[str, dict]:
  """Training image `_IMAGE_INDEX` as a PNG file, and its one object."""
  example = shapes.generate_example(shapes.example_rng("train", _IMAGE_INDEX),
                                    shapes.example_id("train", _IMAGE_INDEX))
  assert len(example["objects"]) == 1
  path = os.path.join(directory, "shape.png")
  Image.fromarray(example["image"]).save(path)
  return path, example["objects"][0]


def _wait(driver, condition, what):
  """Waits for `condition(driver)` to be truthy; returns its value.

  Gradio re-renders parts of the page after each event, so an element found
  a moment ago can be gone ("stale"): the condition is then asked again.
  """
  ui = _module("selenium.webdriver.support.ui")
  stale = _module("selenium.common.exceptions").StaleElementReferenceException
  return ui.WebDriverWait(driver, _TIMEOUT, ignored_exceptions=(stale,)).until(
      lambda d: condition(d), message=f"Waited {_TIMEOUT} s for {what}.")


def _click_text(driver, css, text, what):
  """Clicks the first element matching `css` whose text is `text`.

  Finding and clicking happen in one script, in the page, so a re-render
  between the two cannot leave a stale element.
  """
  script = """
      const found = [...document.querySelectorAll(arguments[0])]
          .find(e => e.innerText.trim() === arguments[1]);
      if (found) found.click();
      return Boolean(found);"""
  _wait(driver, lambda d: d.execute_script(script, css, text), what)


def _find(driver, css):
  by = _module("selenium.webdriver.common.by")
  return driver.find_elements(by.By.CSS_SELECTOR, css)


def _upload(driver, path):
  """Puts a file into the page's file input, clearing the previous one."""
  clear = [b for b in _find(driver, "#image-file button")
           if (b.get_attribute("aria-label") or "").lower() == "clear"]
  if clear:
    clear[0].click()
  inputs = _wait(driver, lambda d: _find(d, "#image-file input[type=file]"),
                 "the file input")
  inputs[0].send_keys(path)


def _caption_text(driver):
  boxes = _find(driver, "#caption textarea, #caption input")
  return boxes[0].get_attribute("value") if boxes else ""


def _attention_png(driver):
  """(src, PNG screenshot) of the attention image on the page."""
  (image,) = _find(driver, "#attention img")
  return image.get_attribute("src"), image.screenshot_as_png


def test_page_captions_an_image_and_shows_each_words_attention(
    server, browser, artifacts, tmp_path, compile_events):
  url, _ = server
  image_path, obj = _shapes_image(str(tmp_path))
  compiled_before = len(compile_events)
  browser.get(url)
  _wait(browser, lambda d: _find(d, "#image-file input[type=file]"),
        "the page")

  _upload(browser, image_path)
  text = _wait(browser, _caption_text, "the caption")
  words = text.split("(score")[0].split()
  print(f"\ntest_demo: caption of a {obj['color']} {obj['shape']}: {text!r}")
  assert obj["color"] in words and obj["shape"] in words, text
  assert "score -" in text  # A log-probability.
  status = _wait(browser, lambda d: _find(d, "#status")[0].text, "the status")
  assert "Captioned shape.png" in status, status

  labels = _wait(browser, lambda d: [l.text for l in _find(d, "#words label")],
                 "the words")
  assert labels == words
  src, pixels = _wait(browser, _attention_png, "the attention image")
  assert src
  # The shape word: where the model looked differs from the first word's.
  _click_text(browser, "#words label", obj["shape"], "the shape word")
  _wait(browser, lambda d: _attention_png(d)[0] != src,
        "the attention of the clicked word")
  new_src, new_pixels = _wait(browser, _attention_png, "the attention image")
  assert new_src != src
  a = np.asarray(Image.open(io.BytesIO(pixels)).convert("L"), np.float32)
  b = np.asarray(Image.open(io.BytesIO(new_pixels)).convert("L"), np.float32)
  assert a.shape == b.shape and np.abs(a - b).mean() > 1.0
  screenshot = os.path.join(artifacts, "demo_captioned.png")
  browser.save_screenshot(screenshot)
  print(f"test_demo: screenshot {screenshot}")

  broken = os.path.join(str(tmp_path), "broken.png")
  with open(image_path, "rb") as f:
    data = f.read()
  with open(broken, "wb") as f:
    f.write(data[:len(data) // 3])  # A PNG cut short.
  _upload(browser, broken)
  status = _wait(browser, lambda d: "Cannot caption" in _find(
      d, "#status")[0].text and _find(d, "#status")[0].text, "the error")
  assert status == ("Cannot caption broken.png: the file is truncated or "
                    "corrupt; re-export or re-download it."), status
  assert not _caption_text(browser)
  screenshot = os.path.join(artifacts, "demo_broken_file.png")
  browser.save_screenshot(screenshot)
  print(f"test_demo: screenshot {screenshot}")

  # Too large: refused by the page before it reaches the model.
  huge = os.path.join(str(tmp_path), "huge.png")
  with open(huge, "wb") as f:
    f.write(os.urandom(int(1.5 * _MAX_UPLOAD_MB * 2**20)))
  _upload(browser, huge)
  _wait(browser, lambda d: "exceed the maximum allowed size" in _find(
      d, "body")[0].text, "the message about the file size")

  # The page still works: an example image, greedy this time.
  _click_text(browser, "#beam-size label", "1", "the beam size 1")
  _click_text(browser, "button, td, div[role=button]", "one_shape.png",
              "the example button")
  status = _wait(browser, lambda d: "one_shape.png" in _find(
      d, "#status")[0].text and _find(d, "#status")[0].text,
      "the example's caption")
  assert "Captioned one_shape.png" in status and "beam 1" in status, status
  assert _caption_text(browser)

  # Everything was compiled at start-up, nothing per request.
  compiles = compile_events[compiled_before:]
  assert not compiles, f"{len(compiles)} compilations during requests"
  # Nothing was fetched from outside this machine.
  host = url.rstrip("/")
  requested = [json.loads(entry["message"])["message"]["params"]["request"]
               ["url"] for entry in browser.get_log("performance")
               if '"Network.requestWillBeSent"' in entry["message"]]
  assert requested
  outside = [u for u in requested
             if not u.startswith((host, "data:", "blob:"))]
  assert not outside, outside


def test_concurrent_requests_are_queued(server, tmp_path):
  url, _ = server
  gradio_client = _module("gradio_client")
  image_path, obj = _shapes_image(str(tmp_path))
  client = gradio_client.Client(url, verbose=False)
  # Equal requests give equal images: each must still arrive whole.
  jobs = [client.submit(gradio_client.handle_file(image_path), beam,
                        "float32", api_name="/caption")
          for beam in (1, 3) * 4]
  results = [job.result(timeout=_TIMEOUT) for job in jobs]
  for status, text, _, attention, figure in results:
    assert status.startswith("Captioned shape.png"), status
    assert obj["color"] in text and obj["shape"] in text, text
    for path in (attention, figure):
      with Image.open(path) as png:
        png.load()  # Raises on a truncated file.


def test_bundled_examples_are_the_shapes_images(tmp_path):
  for bundled, drawn in zip(demo.example_paths(),
                            demo.write_examples(str(tmp_path))):
    assert os.path.basename(bundled) == os.path.basename(drawn)
    np.testing.assert_array_equal(np.asarray(Image.open(bundled)),
                                  np.asarray(Image.open(drawn)))
    assert os.path.getsize(bundled) < 20_000


def test_command_without_a_checkpoint_is_one_sentence(tmp_path):
  _module("gradio")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "visionspeak_jax.tools.demo",
       f"--workdir={tmp_path}", f"--port={demo.free_port()}"],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
