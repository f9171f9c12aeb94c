"""cpu_tuning: the switch, the accelerator check, the compile options, and
when an entry point starts again so that malloc faults in 2 MiB pages
instead of 4 KiB ones. (The CPU split and the XLA flags: test_cpu_devices.)"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

from visionspeak_jax.platform import cpu_tuning

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Maps and unmaps 64 MiB five times, as XLA does with a step's temporaries,
# and reports the page faults of the last four rounds.
_SCRIPT = textwrap.dedent("""
    import ctypes, json, os, resource, sys
    from visionspeak_jax.platform import cpu_tuning
    print("started", flush=True)
    cpu_tuning.reexec(__file__)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    for i in range(5):
      if i == 1:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      libc.free(ctypes.c_void_p(p))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"argv": sys.argv[1:], "faults": faults / 4,
                      "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
""")


def _environment_without_tunables():
  """This process's environment, as if the tunable had never been set."""
  return {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "VISIONSPEAK_HUGE_PAGES",
                       "VISIONSPEAK_CPU_TUNING")}


def _run(tmp_path, env):
  script = tmp_path / "alloc.py"
  script.write_text(_SCRIPT)
  env = dict(env, PYTHONPATH=_REPO)
  result = subprocess.run(
      [sys.executable, "-u", str(script), "--flag=1", "two words"],
      env=env, capture_output=True, text=True, timeout=60, check=True)
  lines = result.stdout.splitlines()
  return lines, json.loads(lines[-1])


def test_wanted_only_where_it_helps():
  madvise = cpu_tuning.wanted({}, "madvise")
  assert madvise == (sys.platform == "linux" and
                     cpu_tuning._glibc_supports_tunable())
  assert not cpu_tuning.wanted({}, "always")  # Huge pages without it.
  assert not cpu_tuning.wanted({}, "never")
  assert not cpu_tuning.wanted({}, "")  # No transparent huge pages.
  assert not cpu_tuning.wanted({"VISIONSPEAK_HUGE_PAGES": "0"}, "madvise")
  assert not cpu_tuning.wanted(
      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise")


def test_environment_keeps_other_tunables():
  env = cpu_tuning.environment(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
  assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=2:"
                                   "glibc.malloc.hugetlb=1")
  assert env["HOME"] == "/h" and env["VISIONSPEAK_HUGE_PAGES"] == "1"
  assert cpu_tuning.environment({})["GLIBC_TUNABLES"] == cpu_tuning.TUNABLE
  assert not cpu_tuning.wanted(env, "madvise")  # Never a second time.


def test_reexec_keeps_the_command_and_gives_huge_pages(tmp_path):
  env = _environment_without_tunables()
  lines, out = _run(tmp_path, env)
  assert out["argv"] == ["--flag=1", "two words"]
  if not cpu_tuning.wanted(env):
    # Nothing to gain here (not glibc 2.35+, or huge pages `always` or
    # `never`): the command runs once, unchanged.
    assert lines.count("started") == 1 and not out["tunables"]
    return
  assert lines.count("started") == 2  # Started again, once.
  assert out["tunables"] == cpu_tuning.TUNABLE
  # 64 MiB is 16 384 pages of 4 KiB: each round faulted them all in before.
  assert out["faults"] < 2000, out

  off = dict(env, VISIONSPEAK_CPU_TUNING="0")
  lines, out = _run(tmp_path, off)
  assert lines.count("started") == 1 and not out["tunables"]
  assert out["faults"] > 16000, out


def test_only_the_program_itself_starts_again(tmp_path):
  # Run through runpy from another program, the module must not restart
  # that program.
  env = _environment_without_tunables()
  (tmp_path / "alloc.py").write_text(_SCRIPT)
  outer = tmp_path / "outer.py"
  outer.write_text(textwrap.dedent(f"""
      import runpy, sys
      sys.path.insert(0, {str(tmp_path)!r})
      print("outer", flush=True)
      runpy.run_path({str(tmp_path / "alloc.py")!r})
  """))
  result = subprocess.run(
      [sys.executable, "-u", str(outer)], env=dict(env, PYTHONPATH=_REPO),
      capture_output=True, text=True, timeout=60, check=True)
  lines = result.stdout.splitlines()
  assert lines.count("outer") == 1 and lines.count("started") == 1, lines
  assert not json.loads(lines[-1])["tunables"]


def test_a_module_run_with_dash_m_starts_again(tmp_path):
  env = _environment_without_tunables()
  package = tmp_path / "some_package"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "prog.py").write_text(_SCRIPT)
  result = subprocess.run(
      [sys.executable, "-u", "-m", "some_package.prog", "--flag=1"],
      env=dict(env, PYTHONPATH=f"{tmp_path}:{_REPO}"), capture_output=True,
      text=True, timeout=60, check=True)
  lines = result.stdout.splitlines()
  out = json.loads(lines[-1])
  assert out["argv"] == ["--flag=1"]
  assert lines.count("started") == (2 if cpu_tuning.wanted(env) else 1)


def test_entry_points_start_again_before_importing_jax():
  for path in ("visionspeak_jax/main.py", "visionspeak_jax/tools/caption.py",
               "visionspeak_jax/tools/demo.py",
               "visionspeak_jax/tools/extract_features.py",
               "benchmarks/benchmark.py"):
    with open(os.path.join(_REPO, path)) as f:
      source = f.read()
    call = source.find("cpu_tuning.reexec(__file__)")
    assert call > 0, path
    for heavy in ("import jax", "import tensorflow", "import numpy",
                  "from absl"):
      first = source.find(heavy)
      assert first == -1 or first > call, (path, heavy)


@pytest.mark.parametrize("mode, text", [
    ("madvise", "always [madvise] never\n"),
    ("never", "always madvise [never]\n"),
    (None, "garbage"),
])
def test_thp_mode(tmp_path, mode, text):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert cpu_tuning._thp_mode(str(path)) == mode
  assert cpu_tuning._thp_mode(str(tmp_path / "missing")) is None


def test_the_switch_turns_every_setting_off(monkeypatch):
  assert cpu_tuning.enabled({}) and cpu_tuning.enabled({"X": "0"})
  assert not cpu_tuning.enabled({cpu_tuning.SWITCH: "0"})
  off = {cpu_tuning.SWITCH: "0", "JAX_PLATFORMS": "cpu"}
  assert not cpu_tuning.wanted(off, "madvise")
  assert "VISIONSPEAK_CPU_TUNING=0" in cpu_tuning.describe(off)
  config = ml_collections.ConfigDict(
      {"cpu_devices": 0, "batch_size": 8, "eval_batch_size": 8})
  assert cpu_tuning.cpu_device_count(config, 4, {"JAX_PLATFORMS": "cpu"}) == 4
  assert cpu_tuning.cpu_device_count(config, 4, off) == 1
  config.cpu_devices = 2  # Asked for: kept with tuning off.
  assert cpu_tuning.cpu_device_count(config, 4, off) == 2

  step = jax.pmap(lambda x: x + 1, axis_name="batch")
  assert cpu_tuning.init_compiler_options() == cpu_tuning.INIT_COMPILER_OPTIONS
  assert cpu_tuning.compile_train_step(step) is not step
  monkeypatch.setenv(cpu_tuning.SWITCH, "0")
  assert cpu_tuning.init_compiler_options() is None
  assert cpu_tuning.compile_train_step(step) is step
  line = cpu_tuning.start(config)
  assert line.startswith("CPU tuning off (VISIONSPEAK_CPU_TUNING=0)"), line


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", False), ("cpu,cuda", False), ("cuda", True), ("tpu", True),
    ("cuda,cpu", True), (" cpu ", False),
])
def test_jax_platforms_decides_the_accelerator(platforms, expected):
  assert cpu_tuning.accelerator_expected({"JAX_PLATFORMS": platforms}) == (
      expected)
  if expected:
    assert not cpu_tuning.wanted({"JAX_PLATFORMS": platforms}, "madvise")


def test_an_installed_plugin_means_an_accelerator(monkeypatch):
  monkeypatch.setattr(cpu_tuning.importlib.metadata, "entry_points",
                      lambda group: ["cuda"] if group == "jax_plugins" else [])
  assert cpu_tuning.accelerator_expected({})
  assert not cpu_tuning.accelerator_expected({"JAX_PLATFORMS": "cpu"})
