"""Tests of benchmarks/benchmark.py: no TensorFlow, the COCO step rows and
the decoder step rows.

Both run the benchmark in a subprocess, as a script is run: its absl flags
are parsed there, and the imports it makes are its own. The subprocess
inherits conftest.py's two fake CPU devices.
"""

import os
import re
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCHMARK = os.path.join(_ROOT, "benchmarks", "benchmark.py")


def _python(*args: str) -> subprocess.CompletedProcess:
  result = subprocess.run(
      [sys.executable, *args], cwd=_ROOT, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_import_loads_no_tensorflow():
  # The accelerator images that benchmarks/gpu.sh runs on have no
  # TensorFlow: only the input pipeline section may import it, lazily.
  code = (
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('b', {_BENCHMARK!r})\n"
      "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
      "             ('tensorflow', 'tensorflow_datasets')))\n")
  assert _python("-c", code).stdout.splitlines()[-1] == "[]"


def test_coco_step_rows():
  out = _python(
      _BENCHMARK, "--coco_resnet=tiny", "--coco_image_size=32",
      "--coco_batch=2", "--coco_steps=1", "--coco_repeats=1",
      "--vocab_size=50", "--peak_size=128", "--decoder_step=false",
      "--beam_sizes=", "--pipeline_dataset=").stdout
  assert "cpu: cpu x 2" in out  # The header names platform and devices.
  for dtype in ("float32", "bfloat16"):
    assert re.search(rf"matmul peak {dtype} \(GFLOP/s\) +[0-9.]+ ", out)
    for variant in ("frozen", "finetune"):
      name = f"coco {variant} {dtype}"
      rate = re.search(rf"{name} images/s +([0-9.]+) ", out)
      assert rate and float(rate.group(1)) > 0, out
      assert re.search(rf"{name} GFLOP/image +[0-9.]+ +convs ", out), out
      share = re.search(rf"{name} utilisation +([0-9.]+)% ", out)
      assert share and float(share.group(1)) > 0, out
  # Four images per step (two per device), so the batch reached both.
  assert "2/device x 2" in out


def test_decoder_step_rows():
  out = _python(
      _BENCHMARK, "--batch_size=4", "--length=3", "--regions=4",
      "--feature_dim=16", "--vocab_size=50", "--embed_dim=8",
      "--hidden_dim=8", "--attention_dim=8", "--steps=1", "--repeats=1",
      "--peak_size=128", "--coco_variants=", "--beam_sizes=",
      "--pipeline_dataset=").stdout
  # Which pages malloc gets is in the header, whatever this machine has.
  assert re.search(r"malloc (huge|4 KiB) pages", out), out
  assert re.search(r"train steps/s +[0-9.]+ ", out), out
  assert re.search(r"minor page faults per step +[0-9]+ ", out), out
  for name in ("of which the recurrence", "the rest of the step"):
    assert re.search(rf"{name} \(ms\) +-?[0-9]+ .* GFLOP at", out), out
  assert re.search(r"train steps/s, bfloat16 +[0-9.]+ .*x float32", out), out
  assert re.search(r"train GFLOP/s, bfloat16 +[0-9.]+ .* of bf16 matmul "
                   r"peak", out), out
