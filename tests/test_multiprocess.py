"""Two local processes on loopback train, and evaluate, like one process."""

import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "tests", "multiprocess_worker.py")
_EVAL_WORKER = os.path.join(_ROOT, "tests", "multiprocess_eval_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  return env


def _run(args, devices, worker=_WORKER, log=None):
  """Starts a worker; its output goes to `log` (a path) or to a pipe."""
  out = subprocess.PIPE if log is None else open(log, "w")
  proc = subprocess.Popen([sys.executable, "-u", worker, *map(str, args)],
                          cwd=_ROOT, env=_env(devices),
                          stdout=out, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  return proc


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
  if proc.log is not None:
    with open(proc.log) as f:
      out = f.read()
  assert proc.returncode == 0, out[-3000:]


def test_two_processes_match_one_process_on_four_devices(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  multi.mkdir()
  single.mkdir()
  port = _free_port()
  workers = [_run([multi, 2, i, port], devices=2) for i in range(2)]
  for proc in workers:
    _finish(proc)
  _finish(_run([single, 1, 0, 0], devices=4))

  p0 = np.load(multi / "params_0.npz")
  p1 = np.load(multi / "params_1.npz")
  alone = np.load(single / "params_0.npz")
  assert set(p0.files) == set(alone.files) and len(p0.files) > 10
  for key in p0.files:
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    np.testing.assert_allclose(p0[key], alone[key], rtol=2e-4, atol=2e-6,
                               err_msg=key)


def test_two_processes_evaluate_like_one_process(tiny_run, tiny_data_dir,
                                                 tmp_path):
  """Each process captions half the split; the scores are one process's."""
  outputs = {}
  for name, count in (("multi", 2), ("single", 1)):
    out, workdir = tmp_path / name, tmp_path / f"{name}_run"
    out.mkdir()
    # Without the scores other tests wrote into the shared run.
    shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns("eval"))
    port = _free_port()
    # Logs in files: a worker never waits on a full pipe.
    workers = [_run([out, count, i, port, workdir, tiny_data_dir], devices=1,
                    worker=_EVAL_WORKER, log=out / f"log_{i}.txt")
               for i in range(count)]
    for proc in workers:
      _finish(proc)
    outputs[name] = []
    for i in range(count):
      with open(out / f"eval_{i}.pkl", "rb") as f:
        outputs[name].append(pickle.load(f))
    # Process 0 alone writes the captions and the scores.
    eval_files = sorted(os.listdir(workdir / "eval"))
    assert eval_files == ["test_step2_beam3.json",
                          "test_step2_beam3_scores.json"], eval_files

  alone = outputs["single"][0]
  assert alone["metrics"]["num_images"] == len(alone["predictions"]) > 8
  assert len(alone["shown"]) == 3
  for got in outputs["multi"]:
    # Exactly equal: the same captions, scored in the same order.
    assert got["metrics"] == alone["metrics"]
    assert list(got["predictions"].items()) == list(
        alone["predictions"].items())
    assert got["report_metrics"] == alone["report_metrics"]
    assert len(got["shown"]) == len(alone["shown"])
    for (image, words, alphas, ref), (image1, words1, alphas1, ref1) in zip(
        got["shown"], alone["shown"]):
      np.testing.assert_array_equal(image, image1)
      np.testing.assert_array_equal(alphas, alphas1)
      assert (words, ref) == (words1, ref1)
  assert outputs["multi"][0]["captions"] == alone["captions"]
  multi = outputs["multi"]
  # Each process decodes its half of the batches.
  assert all(m["decode_calls"] < alone["decode_calls"] for m in multi)
  print(f"\nDecoding {alone['metrics']['num_images']} images, compiled: "
        f"1 process {alone['decode_s']:.2f} s in {alone['decode_calls']} "
        f"calls; 2 processes "
        + ", ".join(f"{m['decode_s']:.2f} s in {m['decode_calls']} calls"
                    for m in multi)
        + f". Whole evaluation: 1 process {alone['evaluate_s']:.2f} s, "
        f"2 processes {max(m['evaluate_s'] for m in multi):.2f} s.")
