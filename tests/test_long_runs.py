"""Long runs survive kills, divergence, damage and operators: `main` as a user
starts it, in subprocesses on two fake CPU devices."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from visionspeak_jax.platform import dtypes
from visionspeak_jax.run import restore

pytestmark = pytest.mark.slow

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A short run that checkpoints every other step and evaluates at the end.
_RUN = ("--config.num_train_steps=12", "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=2", "--config.eval_every_steps=12",
        "--config.num_eval_examples=8")


def _command(workdir, data_dir, *overrides):
  return [sys.executable, "-m", "visionspeak_jax.main",
          "--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", *overrides]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = os.pathsep.join([_ROOT, env.get("PYTHONPATH", "")])
  return env


def _start(workdir, data_dir, *overrides):
  return subprocess.Popen(_command(workdir, data_dir, *overrides), cwd=_ROOT,
                          env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _main(workdir, data_dir, *overrides, timeout=300):
  """Runs main to its end: (exit status, output)."""
  proc = subprocess.run(_command(workdir, data_dir, *overrides), cwd=_ROOT,
                        env=_env(), capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(workdir, step=None):
  run = restore.restore_checkpoint(os.path.join(workdir, "checkpoints"), step)
  return run.step, jax.device_get(run.params)


def _kill_when(proc, condition, timeout=240):
  """SIGKILLs `proc` as soon as `condition()` holds; False if it ended."""
  end = time.time() + timeout
  while time.time() < end:
    if condition():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.002)
  proc.kill()
  raise AssertionError("The run neither reached the kill point nor ended.")


def _trained_to(workdir, step):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return any(f'"step": {step}, "split": "train"' in line for line in f)


def _saving(workdir):
  # Orbax writes a step into a temporary folder and renames it when done.
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  status, output = _main(workdir, tiny_data_dir, *_RUN)
  assert status == 0, output[-3000:]
  # The entry point chose the dtypes in one logged line.
  chosen = dtypes.choose("cpu")[0]
  assert (f"config.dtype and config.decode_dtype = auto: {chosen}, as this "
          "CPU has") in output, output[-3000:]
  return workdir


def test_killed_runs_resume_exactly(uninterrupted, tiny_data_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  kills = []
  # Killed in the middle of training, then (if the poll catches one) in the
  # middle of a checkpoint save, then mid-run again.
  for condition in (lambda: _trained_to(workdir, 4),
                    lambda: _saving(workdir) and _trained_to(workdir, 6),
                    lambda: _trained_to(workdir, 10)):
    proc = _start(workdir, tiny_data_dir, *_RUN)
    kills.append(_kill_when(proc, condition))
  print("kills (mid-training, mid-save, mid-training):", kills)
  assert kills[0] and kills[2]
  # The last restart takes over the killed run's lock and finishes.
  status, output = _main(workdir, tiny_data_dir, *_RUN)
  assert status == 0, output[-3000:]
  assert "Taking over the lock" in output

  step, params = _params(workdir)
  want_step, want = _params(uninterrupted)
  assert step == want_step == 12
  jax.tree.map(np.testing.assert_array_equal, params, want)
  records, want_records = _records(workdir), _records(uninterrupted)
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys))  # Each (step, split) written once.
  assert sorted(keys) == sorted((r["step"], r["split"]) for r in want_records)
  for got, expected in zip(sorted(records, key=lambda r: (r["step"],
                                                            r["split"])),
                           sorted(want_records, key=lambda r: (r["step"],
                                                               r["split"]))):
    got.pop("steps_per_sec", None)
    expected.pop("steps_per_sec", None)
    assert got == expected


def test_divergence_keeps_the_last_finite_checkpoint(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / "diverging")
  status, output = _main(workdir, tiny_data_dir, *_RUN,
                         "--config.num_train_steps=4")
  assert status == 0, output[-3000:]
  # Continued with an absurd learning rate: it diverges before step 6.
  status, output = _main(workdir, tiny_data_dir, *_RUN,
                         "--config.learning_rate=1e30",
                         "--config.checkpoint_every_steps=3",
                         "--config.log_every_steps=10")
  assert status == 1
  lines = output.strip().splitlines()
  assert lines[-1].startswith("error: Training diverged at step 6")
  assert "checkpoint, of step 4, is finite" in lines[-1]
  assert "Traceback" not in output
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()):
    _, params = _params(workdir, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step
  # The advised restart, with a sane rate, resumes from step 4 and finishes.
  status, output = _main(workdir, tiny_data_dir, *_RUN)
  assert status == 0, output[-3000:]
  assert "Resuming from the checkpoint of step 4." in output
  assert _params(workdir)[0] == 12


def test_damaged_checkpoints_fall_back(uninterrupted, tiny_data_dir,
                                       tmp_path):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(uninterrupted, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["10", "12"]
  # The newest step loses half of every data file (which arrays share a
  # file varies from save to save).
  files = glob.glob(os.path.join(ckpt_dir, "12", "state", "**", "d", "*"),
                    recursive=True)
  assert files
  for data in files:
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)
  run = restore.restore_run(workdir)  # What the caption CLI reads.
  assert run.step == 10
  status, output = _main(workdir, tiny_data_dir, *_RUN,
                         "--config.num_train_steps=14")
  assert status == 0, output[-3000:]
  assert "The checkpoint of step 12" in output and "damaged" in output
  assert "Resuming from the checkpoint of step 10." in output

  # Every step damaged: one sentence naming the directory.
  for manifest in glob.glob(os.path.join(ckpt_dir, "*", "state",
                                         "manifest.ocdbt")):
    with open(manifest, "r+b") as f:
      f.truncate(10)
  status, output = _main(workdir, tiny_data_dir, *_RUN,
                         "--config.num_train_steps=16")
  assert status == 1
  last = output.strip().splitlines()[-1]
  assert last.startswith(f"error: No intact checkpoint in {ckpt_dir}")
  assert "Traceback" not in output


def test_a_second_process_on_a_workdir_is_refused(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / "locked")
  first = _start(workdir, tiny_data_dir, *_RUN,
                 "--config.num_train_steps=400", "--config.eval_every_steps=400")
  try:
    end = time.time() + 120
    while not os.path.exists(os.path.join(workdir, "lock")):
      assert first.poll() is None and time.time() < end
      time.sleep(0.05)
    status, output = _main(workdir, tiny_data_dir, *_RUN)
    assert status == 1
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: Another training process (host ")
    assert f"pid {first.pid}" in last and "Traceback" not in output
  finally:
    first.kill()
    first.wait()


# Reads a run in a loop, as the caption CLI, the demo and init_from do,
# until STOP exists; prints one line per read.
_READER = """
import os, sys
from visionspeak_jax.run import checkpoint, restore
workdir, stop = sys.argv[1], sys.argv[2]
while not os.path.exists(stop):
  for best in (False, True):
    try:
      checkpoint.has_checkpoint(os.path.join(workdir, "checkpoints"))
      run = restore.restore_run(workdir, best=best)
      print("read", "best" if best else "checkpoints", run.step, flush=True)
    except checkpoint.CheckpointError as e:
      if not str(e).startswith("No checkpoint in "):
        print("FAILED", repr(e), flush=True)
    except Exception as e:
      print("FAILED", repr(e), flush=True)
"""


def test_reading_a_run_while_it_trains_loses_nothing(tiny_data_dir,
                                                     tmp_path):
  workdir = str(tmp_path / "read")
  stop = str(tmp_path / "stop")
  # Every save is kept, so every announced one must be on disk at the end;
  # best/ keeps one and deletes the others while the reader reads them.
  trainer = _start(workdir, tiny_data_dir, "--config.num_train_steps=40",
                   "--config.checkpoint_every_steps=2",
                   "--config.max_checkpoints_to_keep=100",
                   "--config.eval_every_steps=4", "--config.log_every_steps=10",
                   "--config.num_eval_examples=8")
  env = dict(_env(), XLA_FLAGS="")
  reader = subprocess.Popen([sys.executable, "-c", _READER, workdir, stop],
                            cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  try:
    output, _ = trainer.communicate(timeout=600)
  finally:
    with open(stop, "w"):
      pass
    reads, read_log = reader.communicate(timeout=120)
  assert reader.returncode == 0, read_log[-3000:]
  assert trainer.returncode == 0, output[-3000:]
  ckpt_dir = os.path.join(workdir, "checkpoints")
  announced = sorted(
      int(line.split("Saving the checkpoint of step ")[1].split()[0])
      for line in output.splitlines()
      if "Saving the checkpoint of step " in line and f"{ckpt_dir}." in line)
  assert announced == list(range(2, 41, 2))
  assert sorted(int(s) for s in os.listdir(ckpt_dir)) == announced
  for step in announced:
    assert _params(workdir, step)[0] == step
  assert restore.restore_run(workdir, best=True).step in range(4, 41, 4)
  lines = reads.splitlines()
  print(len(lines), "reads;", lines[:2], lines[-2:])
  assert not [line for line in lines if not line.startswith("read ")], reads
  # The reader read checkpoints while the run was saving more of them.
  assert len({line for line in lines if line.startswith("read checkpoints")
              }) > 2
