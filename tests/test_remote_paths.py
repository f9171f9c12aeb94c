"""A workdir on cloud storage (gs://...) stays a URL everywhere the run writes.

etils.epath's own test double serves the `gs://` scheme here from a local
folder, so the run's files are checked without a network: the lock, the
metrics log, the vocabulary, the workdir checks, and the paths handed to
Orbax and the feature cache (which used to become `<cwd>/gs:/bucket/...`).
"""

import contextlib
import json
import os
import shutil

from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing
import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax.data import feature_cache
from visionspeak_jax.platform import paths
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore
from visionspeak_jax.run import workdir as workdir_lib
from visionspeak_jax.text import vocabulary as vocab_lib

_RUN = "gs://bucket/runs/a"


@contextlib.contextmanager
def _fake_bucket(root):
  """Serves gs://... from `root`, through epath's backend test double."""

  def local(path):
    return os.path.join(root, os.fspath(path).split("://", 1)[1])

  def makedirs(_, path, exist_ok=False):
    os.makedirs(local(path), exist_ok=exist_ok)

  # Each double gets the real backend's method first, and ignores it.
  # With TensorFlow installed, epath sends gs:// to tf.io.gfile whatever the
  # test double says: pretend it is not.
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
      epath_testing.mock_epath(
          open=lambda _, path, mode: open(local(path), mode),
          exists=lambda _, path: os.path.exists(local(path)),
          isdir=lambda _, path: os.path.isdir(local(path)),
          listdir=lambda _, path: os.listdir(local(path)),
          glob=lambda _, path: [],
          makedirs=makedirs,
          mkdir=lambda _, path, exist_ok=False: makedirs(_, path, exist_ok),
          remove=lambda _, path: os.remove(local(path)),
          rename=lambda _, path, dst: os.rename(local(path), local(dst)),
          replace=lambda _, path, dst: os.replace(local(path), local(dst)),
          rmtree=lambda _, path: shutil.rmtree(local(path)),
          stat=lambda _, path: os.stat(local(path))):
    yield local


def test_workdir_files_on_a_url(tmp_path):
  with _fake_bucket(str(tmp_path)) as local:
    config_checks.check_workdir(_RUN)
    assert os.path.isdir(local(_RUN)) and os.listdir(local(_RUN)) == []

    with workdir_lib.Lock(_RUN) as lock:
      assert lock.path == f"{_RUN}/lock"
      holder = json.loads(open(local(lock.path)).read())
      assert holder["pid"] == os.getpid()
      with pytest.raises(errors.ConfigError, match="Another training"):
        other = workdir_lib.Lock(_RUN)
        other._me = {"host": "elsewhere", "pid": 1}  # pylint: disable=protected-access
        other.acquire()
    assert not os.path.exists(local(f"{_RUN}/lock"))

    log = workdir_lib.MetricsLog(_RUN)
    for step in (2, 4, 6):
      log.write({"step": step, "split": "train", "loss": float(step)})
    resumed = workdir_lib.MetricsLog(_RUN)
    resumed.resume(4)
    resumed.write({"step": 4, "split": "train", "loss": -1.0})  # Already in.
    resumed.write({"step": 6, "split": "train", "loss": 0.5})
    with open(local(f"{_RUN}/metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    assert records == [{"step": 2, "split": "train", "loss": 2.0},
                       {"step": 4, "split": "train", "loss": 4.0},
                       {"step": 6, "split": "train", "loss": 0.5}]

    vocab = vocab_lib.Vocabulary.build(["a red circle"])
    vocab.save(f"{_RUN}/vocab.json")
    assert vocab_lib.Vocabulary.load(f"{_RUN}/vocab.json") == vocab
    assert os.path.exists(local(f"{_RUN}/vocab.json"))


def test_checkpoint_and_cache_paths_stay_urls(tmp_path):
  # Orbax itself needs google-cloud-storage and a network for gs://; what
  # this package hands it must be the URL, not `<cwd>/gs:/bucket/...`.
  assert paths.absolute(f"{_RUN}/checkpoints") == f"{_RUN}/checkpoints"
  assert paths.absolute("relative/run") == os.path.abspath(
      "relative/run")
  config = tiny.get_config()
  assert feature_cache.cache_dir(config, _RUN) == f"{_RUN}/features"
  with _fake_bucket(str(tmp_path)):
    assert not checkpoint_lib.has_checkpoint(f"{_RUN}/checkpoints")
    with pytest.raises(checkpoint_lib.CheckpointError,
                       match=f"No checkpoint in {_RUN}/checkpoints:"):
      restore.restore_run(_RUN)
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))
