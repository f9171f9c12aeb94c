"""Paths that may be URLs (`gs://bucket/run`), as Orbax, TFDS and etils take.

Local paths are made absolute once, where a run starts, so that a later
change of directory cannot move a run's files; URLs are left as they are.
"""

import os


def is_url(path: str) -> bool:
  return "://" in str(path)


def absolute(path: str) -> str:
  """An absolute local path, or the URL as it is."""
  return str(path) if is_url(path) else os.path.abspath(path)
