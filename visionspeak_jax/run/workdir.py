"""A run directory: one training process at a time, one metrics log.

`Lock` keeps a second training process off a workdir (the holder's host and
pid are in WORKDIR/lock; a lock left by a killed process on this host is
taken over). `MetricsLog` writes WORKDIR/metrics.jsonl and, when a run
resumes, drops the records written after the step it resumes from, so every
(step, split) is written once.

Every path may be a URL (`gs://bucket/run`): files go through
`etils.epath`, as Orbax and TFDS do (see `platform/paths.py`).
"""

import json
import os
import socket
from typing import Any

from absl import logging
from etils import epath

from visionspeak_jax import errors
from visionspeak_jax.platform import paths


def write_atomically(path: str, text: str) -> None:
  """Replaces a file's contents; a kill leaves the old or the new file."""
  tmp = epath.Path(f"{path}.tmp-{os.getpid()}")
  tmp.write_text(text)
  tmp.replace(path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process: alive.
  return True


class Lock:
  """WORKDIR/lock, held by one training process (process 0 of a cluster)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self._me = {"host": socket.gethostname(), "pid": os.getpid()}

  def _holder(self) -> dict[str, Any] | None:
    try:
      return json.loads(epath.Path(self.path).read_text())
    except (OSError, ValueError):
      return None  # Gone, or half-written by a process that died.

  def _create(self) -> bool:
    """Creates the lock file if there is none; False if there is one."""
    if paths.is_url(self.path):
      # Object stores have no exclusive create: check, then write.
      if epath.Path(self.path).exists():
        return False
      write_atomically(self.path, json.dumps(self._me))
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(self._me, f)
    return True

  def acquire(self) -> None:
    """Takes the lock, or a stale one.

    Raises:
      errors.ConfigError: a live process holds it.
    """
    if self._create():
      return
    holder = self._holder()
    if holder == self._me:
      return  # Already ours.
    if holder is not None and not (
        holder.get("host") == self._me["host"] and
        not _alive(int(holder.get("pid", -1)))):
      raise errors.ConfigError(
          f"Another training process (host {holder.get('host')}, pid "
          f"{holder.get('pid')}) is using {os.path.dirname(self.path)}: "
          f"wait for it to end, pass another --workdir, or, if that process "
          f"is gone, delete {self.path}.")
    logging.warning("Taking over the lock %s left by %s.", self.path,
                    holder or "a process that died while writing it")
    write_atomically(self.path, json.dumps(self._me))

  def release(self) -> None:
    """Drops the lock if this process still holds it."""
    if self._holder() == self._me:
      epath.Path(self.path).unlink()

  def __enter__(self) -> "Lock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class MetricsLog:
  """WORKDIR/metrics.jsonl, one JSON record per (step, split)."""

  def __init__(self, workdir: str, enabled: bool = True):
    """Opens the log; `enabled` is False on every process but the first."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    # The whole file, rewritten on every record: object stores cannot
    # append, and a kill then leaves the old file or the new one.
    self._lines: list[str] = []
    self._written: set[tuple[int, str]] = set()

  def resume(self, step: int) -> None:
    """Drops the records after `step`: a resumed run writes them again."""
    path = epath.Path(self.path)
    if not self.enabled or not path.exists():
      return
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
        if record["step"] <= step:
          self._lines.append(line + "\n")
          self._written.add((record["step"], record["split"]))
      except (ValueError, KeyError, TypeError):
        pass  # A line cut short by a kill.
    write_atomically(self.path, "".join(self._lines))

  def write(self, record: dict[str, Any]) -> None:
    """Adds a record, unless its (step, split) is already there."""
    key = (record["step"], record["split"])
    if self.enabled and key not in self._written:
      self._lines.append(json.dumps(record) + "\n")
      write_atomically(self.path, "".join(self._lines))
      self._written.add(key)
