"""Tests of benchmarks/benchmark.py: no TensorFlow, the COCO step rows, the
decoder step rows and the list of the step's matmuls.

The row tests run the benchmark in a subprocess, as a script is run: its
absl flags are parsed there, and the imports it makes are its own. The
subprocess inherits conftest.py's two fake CPU devices.
"""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import optax
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCHMARK = os.path.join(_ROOT, "benchmarks", "benchmark.py")
# The decoder at sizes that compile and run in seconds.
_TINY_DECODER = ("--batch_size=4", "--length=3", "--regions=4",
                 "--feature_dim=16", "--vocab_size=50", "--embed_dim=8",
                 "--hidden_dim=8", "--attention_dim=8")


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


@pytest.mark.slow
def test_coco_step_rows():
  out = _python(
      _BENCHMARK, "--coco_resnet=tiny", "--coco_image_size=32",
      "--coco_batch=2", "--coco_steps=1", "--coco_repeats=1",
      "--vocab_size=50", "--peak_size=128", "--decoder_step=false",
      "--beam_sizes=", "--pipeline_dataset=", "--shapes_dtypes=").stdout
  assert "cpu: cpu x 2" in out  # The header names platform and devices,
  assert re.search(r"CPUs \(.*; (CPU flags|no AMX)", out)  # and the CPU.
  for dtype in ("float32", "bfloat16"):
    assert re.search(rf"matmul peak {dtype} \(GFLOP/s\) +[0-9.]+ ", out)
    for variant in ("frozen", "finetune", "frozen_14x14"):
      name = f"coco {variant} {dtype}"
      rate = re.search(rf"{name} images/s +([0-9.]+) ", out)
      assert rate and float(rate.group(1)) > 0, out
      assert re.search(rf"{name} GFLOP/image +[0-9.]+ +convs ", out), out
      share = re.search(rf"{name} utilisation +([0-9.]+)% ", out)
      assert share and float(share.group(1)) > 0, out
  # Four images per step (two per device), so the batch reached both,
  # each with the recipes' five captions.
  assert "2/device x 2, 5 captions each" in out
  # The 14x14 recipe's step attends over 196 regions.
  assert re.search(r"coco frozen_14x14 float32 images/s .* 196 regions",
                   out), out


@pytest.mark.slow
def test_decoder_step_rows():
  out = _python(
      _BENCHMARK, *_TINY_DECODER, "--steps=1", "--repeats=1",
      "--peak_size=128", "--coco_variants=", "--beam_sizes=",
      "--pipeline_dataset=", "--shapes_dtypes=", "--extra_regions=9").stdout
  # The step at --regions, then at each of --extra_regions.
  head, at_nine = out.split("decoder at R=9 (3x3):\n")
  for part in (head, at_nine):
    assert re.search(r"train steps/s +[0-9.]+ ", part), out
  # Which pages malloc gets is in the header, whatever this machine has.
  assert re.search(r"malloc (huge|4 KiB) pages", out), out
  assert re.search(r"train steps/s +[0-9.]+ ", out), out
  assert re.search(r"minor page faults per step +[0-9]+ ", out), out
  for name in ("of which the recurrence", "the rest of the step"):
    assert re.search(rf"{name} \(ms\) +-?[0-9]+ .* GFLOP at", out), out
  assert re.search(r"its matmuls alone, summed \(ms\) +[0-9]+ +26 matmuls, "
                   r".* furthest from the peak: .* GFLOP/s", out), out
  assert re.search(r"the Adam update alone \(ms\) +[0-9.]+ .* M parameters",
                   out), out
  assert re.search(r"ceiling: share of peak +[0-9]+% ", out), out
  assert re.search(r"train steps/s, bfloat16 +[0-9.]+ .*x float32", out), out
  assert re.search(r"train GFLOP/s, bfloat16 +[0-9.]+ .* of bf16 matmul "
                   r"peak", out), out


@pytest.mark.slow
def test_shapes_step_rows():
  out = _python(
      _BENCHMARK, "--shapes_steps=1", "--coco_repeats=1", "--peak_size=128",
      "--coco_variants=", "--decoder_step=false", "--beam_sizes=",
      "--pipeline_dataset=").stdout
  assert re.search(r"shapes float32 steps/s +[0-9.]+ +[0-9.]+ ms/step .* "
                   r"GFLOP \(convs [0-9]+%\)", out), out
  assert re.search(r"shapes bfloat16 steps/s +[0-9.]+ +[0-9.]+ ms/step .*"
                   r"x float32", out), out


def test_profile_groups_every_op():
  out = _python(
      os.path.join(_ROOT, "benchmarks", "profile.py"), *_TINY_DECODER,
      "--beam_batch=2", "--beam_length=3", "--profile_steps=1",
      "--top=3").stdout
  assert re.search(r"matmul peak: float32 [0-9]+, bfloat16 [0-9]+ GFLOP/s",
                   out), out
  for dtype in ("float32", "bfloat16"):
    assert f"decoder training step, {dtype}" in out, out
    assert f"beam 5, {dtype}" in out, out
  # Every phase of training shows up, and the matmuls have a rate.
  for where in ("forward, in loop", "backward, in loop",
                "forward, outside loops", "backward, outside loops",
                "update, outside loops"):
    assert where in out, out
  assert re.search(r"matmul, library \(YNNPACK\) +[0-9.]+ +[0-9]+% +[0-9]+ ",
                   out), out
  assert out.count("slowest ops") == 4, out


def test_bfloat16_times_three_versions_of_each_part():
  out = _python(
      os.path.join(_ROOT, "benchmarks", "bfloat16.py"), *_TINY_DECODER,
      "--resnet_size=tiny", "--resnet_batch=2", "--resnet_image_size=32",
      "--rounds=2", "--calls=1", "--parts=decoder,resnet").stdout
  assert re.search(r"CPU flags|no AMX", out), out
  assert "decoder training step" in out and "ResNet-tiny, 2 x 32 px" in out
  for version in ("float32", "bfloat16, autodiff", "bfloat16"):
    assert len(re.findall(rf"\n  {re.escape(version)} +[0-9.]+ ms +\(best "
                          r"[0-9.]+\), [0-9.]+x float32", out)) == 2, out


@pytest.fixture(name="benchmark", scope="module")
def _benchmark():
  """benchmarks/benchmark.py as a module (its flags are defined, unparsed)."""
  spec = importlib.util.spec_from_file_location("benchmark", _BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_SIZES = dict(batch=4, length=3, regions=5, feature_dim=12, vocab_size=40,
              embed_dim=6, hidden_dim=8, attention_dim=7)


@pytest.mark.parametrize("gate,deep_output", [
    ("vector", True), ("scalar", False), ("none", True)])
def test_step_matmuls_are_the_steps_dot_generals(benchmark, gate,
                                                 deep_output):
  # The ceiling row times `step_matmuls` one by one: the list must be the
  # matmuls the step runs, no more and no fewer. The step's traced
  # dot_generals hold them, plus what the list leaves out on purpose: the
  # attention scores' products ([B,R,A]@[A], elementwise-sized: forward and
  # v's gradient), and the features' gradient (one batched matmul after the
  # backward scan), which XLA drops: the features are an input here.
  sizes = dict(_SIZES, gate=gate, deep_output=deep_output)
  decoder = benchmark.decoder
  params = decoder.init(
      jax.random.key(0), vocab_size=sizes["vocab_size"],
      feature_dim=sizes["feature_dim"], embed_dim=sizes["embed_dim"],
      hidden_dim=sizes["hidden_dim"], attention_dim=sizes["attention_dim"],
      gate=gate, deep_output=deep_output)
  optimizer = optax.adam(1e-4)
  b, t, r = sizes["batch"], sizes["length"], sizes["regions"]
  features = jax.numpy.ones((b, r, sizes["feature_dim"]))
  tokens = benchmark.random_tokens(benchmark.np.random.RandomState(0), b, t,
                                   sizes["vocab_size"])
  step = benchmark.make_train_step(optimizer, 0.5, 1.0)
  traced = benchmark.jaxpr_matmul_flops(jax.make_jaxpr(step)(
      params, optimizer.init(params), features, tokens,
      jax.random.key(1)).jaxpr)
  listed = sum(benchmark.matmul_flops(m)
               for m in benchmark.step_matmuls(length=t, **{
                   k: v for k, v in sizes.items() if k != "length"}))
  scores = t * 2 * b * r * sizes["attention_dim"]
  context = t * 2 * b * r * sizes["feature_dim"]
  assert listed + 2 * scores + context == traced


def test_matmul_flops_counts_every_index(benchmark):
  matmul = benchmark.Matmul
  assert benchmark.matmul_flops(matmul("x", "mk,kn->mn", (2, 3), (3, 5))) == 60
  # A transposed weight: [2, 5] @ [3, 5]^T -> [2, 3].
  assert benchmark.matmul_flops(matmul("x", "mn,kn->mk", (2, 5), (3, 5))) == 60
  # Per step of a scan, times the steps; batched products count the batch.
  assert benchmark.matmul_flops(
      matmul("x", "br,brc->bc", (2, 3), (2, 3, 4), 7)) == 2 * 24 * 7
