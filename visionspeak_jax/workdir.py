"""A run directory: one training process at a time, one metrics log.

`Lock` keeps a second training process off a workdir (the holder's host and
pid are in WORKDIR/lock; a lock left by a killed process on this host is
taken over). `MetricsLog` appends WORKDIR/metrics.jsonl and, when a run
resumes, drops the records written after the step it resumes from, so every
(step, split) is written once.
"""

import json
import os
import socket
from typing import Any

from absl import logging

from visionspeak_jax import errors


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
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # Gone, or half-written by a process that died.

  def _write(self) -> None:
    tmp = f"{self.path}.{self._me['pid']}"
    with open(tmp, "w") as f:
      json.dump(self._me, f)
    os.replace(tmp, self.path)

  def acquire(self) -> None:
    """Takes the lock, or a stale one.

    Raises:
      errors.ConfigError: a live process holds it.
    """
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      holder = self._holder()
      if holder is not None and holder != self._me and not (
          holder.get("host") == self._me["host"] and
          not _alive(int(holder.get("pid", -1)))):
        raise errors.ConfigError(
            f"Another training process (host {holder.get('host')}, pid "
            f"{holder.get('pid')}) is using {os.path.dirname(self.path)}: "
            f"wait for it to end, pass another --workdir, or, if that "
            f"process is gone, delete {self.path}.") from None
      logging.warning("Taking over the lock %s left by %s.", self.path,
                      holder or "a process that died while writing it")
      self._write()
      return
    with os.fdopen(fd, "w") as f:
      json.dump(self._me, f)

  def release(self) -> None:
    """Drops the lock if this process still holds it."""
    if self._holder() == self._me:
      os.remove(self.path)

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
    self._written: set[tuple[int, str]] = set()

  def resume(self, step: int) -> None:
    """Drops the records after `step`: a resumed run writes them again."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
        if record["step"] <= step:
          kept.append(line)
          self._written.add((record["step"], record["split"]))
      except (ValueError, KeyError, TypeError):
        pass  # A line cut short by a kill.
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, record: dict[str, Any]) -> None:
    """Appends a record, unless its (step, split) is already there."""
    key = (record["step"], record["split"])
    if self.enabled and key not in self._written:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      self._written.add(key)
