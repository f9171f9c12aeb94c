"""Huge pages for XLA's CPU buffers: glibc's `hugetlb` tunable, set at start.

XLA:CPU allocates an executable's temporaries afresh at every call: 201 MB
for the decoder benchmark's training step. glibc serves a block that size
with a new `mmap` and gives it back with `munmap`, so every call faults
every page in again, 4 KiB at a time: 51 700 minor faults per step, 7-14 %
of the step's time on a 2-core AMD EPYC, and a fifth of the default shapes
run's step (benchmarks/README.md).
glibc 2.35 and later can ask for transparent huge pages on those mappings
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): 2 MiB pages, 600 faults per step,
and the same numbers bit for bit (only where the memory comes from
changes).

The tunable is read once, when a process starts, so `reexec()` starts the
command again with it set, before JAX or TensorFlow are imported; the entry
points (`main`, `caption`, `demo`, `extract_features`,
`benchmarks/benchmark.py`) call it first. It does nothing where it cannot
help: not Linux with glibc 2.35+, huge pages off (`never`) or already used
for everything (`always`), the tunable already set, or
`VISIONSPEAK_HUGE_PAGES` set (`=0` turns it off) in the environment.
"""

import importlib.util
import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
# Set in the re-executed process: never more than one re-execution.
_MARK = "VISIONSPEAK_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_supports_tunable() -> bool:
  name, version = platform.libc_ver()
  if name != "glibc":
    return False
  try:
    return tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def _thp_mode(path: str = _THP) -> str | None:
  """The kernel's transparent huge page mode (`madvise`, ...), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _tunable_set(env: Mapping[str, str]) -> bool:
  return "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", "")


def wanted(environ: Mapping[str, str] | None = None,
           thp_mode: str | None = None) -> bool:
  """Whether starting again with the tunable would give huge pages."""
  env = os.environ if environ is None else environ
  if sys.platform != "linux" or _MARK in env or _tunable_set(env):
    return False
  mode = _thp_mode() if thp_mode is None else thp_mode
  # `always` gives huge pages without the tunable; `never` refuses them.
  return mode == "madvise" and _glibc_supports_tunable()


def environment(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with the tunable added to any tunables already set."""
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  return dict(environ, GLIBC_TUNABLES=":".join(tunables + [TUNABLE]),
              **{_MARK: "1"})


def describe(environ: Mapping[str, str] | None = None) -> str:
  """One phrase for logs and benchmark headers: which pages malloc gets."""
  env = os.environ if environ is None else environ
  if _tunable_set(env):
    return f"malloc huge pages (GLIBC_TUNABLES={env['GLIBC_TUNABLES']})"
  mode = _thp_mode()
  if mode == "always":
    return "malloc huge pages (the kernel's transparent huge pages: always)"
  if env.get(_MARK) == "0":
    return f"malloc 4 KiB pages ({_MARK}=0)"
  return f"malloc 4 KiB pages (transparent huge pages: {mode or 'unknown'})"


def _runs(program: str) -> bool:
  """Whether this process's command line runs `program` (a module's file).

  Reads `sys.orig_argv`: `python [options] -m MODULE ...` or `python
  [options] SCRIPT ...`. `-c`, stdin, or anything unrecognised: False.
  """
  args = sys.orig_argv[1:]
  for i, arg in enumerate(args):
    if arg == "-m":
      name = args[i + 1] if i + 1 < len(args) else ""
      spec = importlib.util.find_spec(name) if name else None
      return bool(spec and spec.origin and os.path.exists(spec.origin)
                  and os.path.samefile(spec.origin, program))
    if arg == "-c" or arg == "-":
      return False
    if not arg.startswith("-") and os.path.isfile(arg):
      return os.path.samefile(arg, program)
  return False


def reexec(program: str) -> None:
  """Starts this command again with huge pages for malloc, when `wanted`.

  The same interpreter, options and arguments (`sys.orig_argv`), and the
  same process id, so launchers and job schedulers see nothing change.
  Call it before anything heavy is imported; it returns only when nothing
  is to be done.

  Args:
    program: the caller's `__file__`. Only when it is the program this
      process runs (`python -m visionspeak_jax.main`, `python
      benchmarks/benchmark.py`) does the command start again; run from
      another program (`runpy`), that program would start over instead.
  """
  if not _runs(program) or not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environment(os.environ))
