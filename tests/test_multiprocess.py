"""Two local processes on loopback train exactly like one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = os.path.join(_ROOT, "tests", "multiprocess_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  return env


def _run(args, devices):
  return subprocess.Popen([sys.executable, _WORKER, *map(str, args)],
                          cwd=_ROOT, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc):
  out, _ = proc.communicate(timeout=600)
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
