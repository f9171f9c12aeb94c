"""CPU tuning, all in one place: what each setting does and why.

Every setting below only changes how fast a CPU run goes, never its
numbers (the CPU device split changes how a batch is divided, see 3), and
each was kept because an A/B on the default run or the decoder benchmark
showed it helps (docs/performance.md has the current numbers). None of it
applies where JAX runs on an accelerator (`accelerator_expected`), and
`VISIONSPEAK_CPU_TUNING=0` in the environment turns all of it off.

1. Huge pages for malloc (`reexec`, the one call at the top of each entry
   point, before JAX is imported). XLA:CPU allocates an executable's
   temporaries afresh at every call; glibc serves blocks that size with a
   new `mmap` and gives them back with `munmap`, so every call faults each
   page in again, 4 KiB at a time. glibc 2.35+ can ask for transparent huge
   pages on those mappings (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): 2 MiB
   pages, a few hundred faults a step instead of tens of thousands. The
   tunable is read once, when a process starts, so `reexec` starts the same
   command again (same pid, interpreter, options and arguments) with it set.
   It does nothing where it cannot help: not Linux with glibc 2.35+, huge
   pages off (`never`) or already used for everything (`always`), or the
   tunable already set.
2. XLA:CPU flags (`CPU_XLA_FLAGS`, added to XLA_FLAGS by `start`). The
   concurrency-optimised scheduler orders a program breadth first so that
   independent operations can run at once; with every core already busy
   (one JAX device per core, or one device's matmuls spread over all cores)
   they only contend, so runs schedule depth first. A flag XLA_FLAGS names
   already keeps the user's value; a flag this jaxlib does not define is
   left out (XLA would end the process on it).
3. One JAX device per core (`split_cpu`, by `start`). XLA:CPU's intra-op
   threads scale poorly over small matmuls; the same batch split over one
   device per core (the most devices, at most one per core, that divide
   both batch sizes) trains faster. `config.cpu_devices = N` asks for N
   devices, tuning on or off; 0 (the default) is this automatic split, and
   one device when tuning is off.
4. The training step compiled at LLVM -O2 (`compile_train_step`) instead of
   XLA's default -O3: a faster step and a shorter compile on the default
   run, the same on the COCO-sized decoder step. JAX takes compiler options
   only on a top-level `jax.jit`, so it applies to one process only.
5. The random init compiled at XLA's lowest optimisation level
   (`INIT_COMPILER_OPTIONS` via `init_compiler_options`): it runs once, and
   an optimised compile costs more than it saves.
"""

import glob
import importlib.metadata
import importlib.util
import mmap
import os
import platform
import sys
from typing import Any, Callable, Mapping, TYPE_CHECKING

from visionspeak_jax import errors

if TYPE_CHECKING:  # Entry points import this module first: kept light.
  import ml_collections

SWITCH = "VISIONSPEAK_CPU_TUNING"
TUNABLE = "glibc.malloc.hugetlb=1"
# Set in the re-executed process: never more than one re-execution.
_MARK = "VISIONSPEAK_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def enabled(environ: Mapping[str, str] | None = None) -> bool:
  """Whether CPU tuning is on: unless `VISIONSPEAK_CPU_TUNING=0`."""
  env = os.environ if environ is None else environ
  return env.get(SWITCH, "1").strip() != "0"


def accelerator_expected(environ: Mapping[str, str] | None = None) -> bool:
  """Whether JAX will run on a GPU or TPU; answered before JAX starts.

  `JAX_PLATFORMS` decides where it is set (its first platform); otherwise an
  installed accelerator plugin (a `jax_plugins` entry point, as the CUDA
  and ROCm plugins register, or libtpu) means an accelerator.
  """
  env = os.environ if environ is None else environ
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",")
               if p.strip()]
  if platforms:
    return platforms[0] != "cpu"
  return bool(importlib.metadata.entry_points(group="jax_plugins")
              or importlib.util.find_spec("libtpu"))


def _applies(environ: Mapping[str, str] | None = None) -> bool:
  return enabled(environ) and not accelerator_expected(environ)


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
  if (not _applies(env) or sys.platform != "linux" or _MARK in env
      or _tunable_set(env)):
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
  if not enabled(env):
    return f"malloc 4 KiB pages ({SWITCH}=0)"
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

  The one call of this module each entry point makes itself, first.

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


def check_cpu_devices(config: "ml_collections.ConfigDict") -> None:
  """Raises errors.ConfigError unless `config.cpu_devices` is a count >= 0.

  The one check of the field: `start` runs before the rest of the config is
  validated, and `config_checks.validate` calls it too.
  """
  count = config.cpu_devices
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise errors.ConfigError(
        f"config.cpu_devices must be a whole number >= 0 (0: one device per "
        f"core), got {count!r}: fix --config.cpu_devices.")


def cpu_device_count(config: "ml_collections.ConfigDict", cores: int,
                     environ: Mapping[str, str] | None = None) -> int:
  """The JAX devices to split a CPU of `cores` cores into for `config`.

  `config.cpu_devices`, or for 0 the most devices, at most one per core,
  that divide both `batch_size` and `eval_batch_size` (one device with
  tuning off).

  Raises:
    errors.ConfigError: `cpu_devices` is negative or not a whole number.
  """
  check_cpu_devices(config)
  wanted_count = config.cpu_devices
  if wanted_count:
    return wanted_count
  if not enabled(environ):
    return 1
  return next(n for n in range(max(cores, 1), 0, -1)
              if config.batch_size % n == 0 and config.eval_batch_size % n == 0)


def _in_xla_flags(name: str) -> bool:
  """Whether XLA_FLAGS sets the flag `name` already (the user's wins)."""
  return name in os.environ.get("XLA_FLAGS", "")


def split_cpu(config: "ml_collections.ConfigDict") -> int | None:
  """Splits the CPU into `cpu_device_count` JAX devices; before JAX starts.

  An explicit split in `XLA_FLAGS` or `jax_num_cpu_devices` is left as it
  is.

  Returns:
    The device count asked for, or None where the split was already set.

  Raises:
    errors.ConfigError: a wrong `config.cpu_devices`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  count = cpu_device_count(config, len(os.sched_getaffinity(0)))
  if (_in_xla_flags("xla_force_host_platform_device_count")
      or jax.config.jax_num_cpu_devices != -1):
    return None
  jax.config.update("jax_num_cpu_devices", count)
  return count


# (name, value) of the XLA:CPU flags `start` adds to XLA_FLAGS (setting 2).
CPU_XLA_FLAGS = (("xla_cpu_enable_concurrency_optimized_scheduler", "false"),)


def xla_defines(flag: str) -> bool:
  """Whether the installed XLA (jaxlib) has the flag `flag`.

  Flags come and go between releases; each flag's name is a string in the
  library that parses XLA_FLAGS.
  """
  import jaxlib  # pylint: disable=g-import-not-at-top
  needle = b"\0" + flag.encode() + b"\0"
  libraries = sorted(glob.glob(os.path.join(os.path.dirname(jaxlib.__file__),
                                            "*.so")),
                     key=os.path.getsize, reverse=True)
  for path in libraries:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0,
                                          access=mmap.ACCESS_READ) as data:
      if data.find(needle) >= 0:
        return True
  return False


def set_cpu_xla_flags() -> list[str]:
  """Adds `CPU_XLA_FLAGS` to XLA_FLAGS; before JAX starts, or no effect.

  A flag XLA_FLAGS names already keeps the value given there; one this
  jaxlib does not define is left out.

  Returns:
    The flags added, as written into XLA_FLAGS.
  """
  added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS
           if not _in_xla_flags(name) and xla_defines(name)]
  if added:
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), *added]).strip()
  return added


def start(config: "ml_collections.ConfigDict") -> str:
  """Settings 2 and 3, before JAX starts; `runtime.start` calls it.

  Returns:
    One line for the log: what was set, or why nothing was.
  """
  if not enabled():
    split = split_cpu(config)
    return (f"CPU tuning off ({SWITCH}=0)"
            + (f"; the CPU split into {split} devices (--config.cpu_devices)"
               if (split or 0) > 1 else ""))
  if accelerator_expected():
    return "CPU tuning off: JAX runs on an accelerator"
  added = set_cpu_xla_flags()
  split = split_cpu(config)
  parts = []
  if (split or 0) > 1:
    parts.append(f"the CPU split into {split} devices (--config.cpu_devices)")
  if added:
    parts.append("XLA flags " + " ".join(added))
  parts.append(describe())
  return "CPU tuning: " + "; ".join(parts)


_CPUINFO = "/proc/cpuinfo"
# `lscpu`/`/proc/cpuinfo` flags of the matrix units XLA:CPU's bfloat16
# matmuls use (Intel AMX: tiles and their bfloat16 multiply), and of the
# AVX-512 bfloat16 dot product that CPUs without them may have.
AMX_FLAGS = ("amx_tile", "amx_bf16")
AVX512_BF16_FLAG = "avx512_bf16"


def _cpuinfo(field: str, path: str = _CPUINFO) -> str | None:
  """The first `field` line's value in `/proc/cpuinfo`; None where absent
  (not Linux, or no such field)."""
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.startswith(field):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_model() -> str:
  """The CPU's model name as `lscpu` prints it, for logs and headers."""
  return _cpuinfo("model name") or platform.processor() or "unknown CPU"


def cpu_flags(path: str = _CPUINFO) -> frozenset[str]:
  """The CPU's feature flags as `lscpu` prints them; empty where unknown.

  Read from the first `flags` line of `/proc/cpuinfo` (Linux on x86); other
  systems report none, so nothing is assumed about them.
  """
  return frozenset((_cpuinfo("flags", path) or "").split())


def has_amx(flags: frozenset[str] | None = None) -> bool:
  """Whether the CPU has AMX with bfloat16 (`amx_tile` and `amx_bf16`)."""
  flags = cpu_flags() if flags is None else flags
  return all(flag in flags for flag in AMX_FLAGS)


def cpu_flags_phrase(flags: frozenset[str] | None = None) -> str:
  """The bfloat16 matmul hardware in a phrase, for logs and headers."""
  flags = cpu_flags() if flags is None else flags
  names = [f for f in AMX_FLAGS + (AVX512_BF16_FLAG,) if f in flags]
  return ("CPU flags " + " ".join(names) if names
          else "no AMX or AVX512-BF16 CPU flags")


def _on_cpu() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return enabled() and jax.default_backend() == "cpu"


# Setting 4.
STEP_COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}
# Setting 5.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                         "xla_llvm_disable_expensive_passes": True}


def compile_train_step(p_train_step: Callable[..., Any]) -> Callable[..., Any]:
  """The train step compiled with `STEP_COMPILER_OPTIONS` on a CPU.

  Call the result directly (as the training loop does), not inside another
  transformation (`jax.jit`, `jax.make_jaxpr`).

  Args:
    p_train_step: `step.compile_steps`'s train step.

  Returns:
    That step, compiled with the options where it runs on a CPU in one
    process with tuning on; as it is elsewhere.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not _on_cpu() or jax.process_count() > 1:
    return p_train_step
  return jax.jit(p_train_step, donate_argnums=(0,),
                 compiler_options=STEP_COMPILER_OPTIONS)


def init_compiler_options() -> dict[str, Any] | None:
  """Compiler options for the random init: `INIT_COMPILER_OPTIONS` on a CPU."""
  return INIT_COMPILER_OPTIONS if _on_cpu() else None
