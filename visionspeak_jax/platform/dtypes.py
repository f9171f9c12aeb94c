"""What `config.dtype = "auto"` (and `decode_dtype`) become on this machine.

bfloat16 mixed precision (bfloat16 matmul inputs, float32 sums, loss and
parameters) pays where the hardware multiplies bfloat16 at a multiple of
its float32 rate, and the run's numbers stay within its accuracy bars
(benchmarks/README.md measures both):

- a CPU with AMX (`amx_tile` and `amx_bf16` in `/proc/cpuinfo`'s flags):
  XLA:CPU's matmul library runs bfloat16 products on its tiles, a multiple
  of the float32 matmul rate, so "auto" is bfloat16;
- any other CPU: float32. With AVX512-BF16 alone the bfloat16 matmul peak
  is above float32's, but the default run's step gains little (its 3x3
  convolutions run in float32 either way): too little to publish a second
  final line for those CPUs (docs/performance.md, "bfloat16", has the
  measurements);
- a GPU or TPU: float32, so a run's numbers do not change with where it
  runs; ask for bfloat16 there with `--config.dtype=bfloat16`.

A run resolves "auto" once, when it starts (`runtime.start`), logs the
choice in one line, and saves the resolved value with its checkpoints: the
caption CLI and evaluation read it back from there. An explicit
`--config.dtype` or `--config.decode_dtype` is used as given.
"""

from typing import TYPE_CHECKING

from visionspeak_jax.platform import cpu_tuning

if TYPE_CHECKING:  # Entry points import the platform first: kept light.
  import ml_collections

AUTO = "auto"
# The config fields that take "auto".
FIELDS = ("dtype", "decode_dtype")


def choose(platform: str, flags: frozenset[str] | None = None
           ) -> tuple[str, str]:
  """("bfloat16" or "float32", why) for a JAX platform and CPU flags.

  Args:
    platform: `jax.default_backend()`: "cpu", "gpu", "tpu", ...
    flags: the CPU's flags (`cpu_tuning.cpu_flags`, read when None).
  """
  if platform != "cpu":
    return "float32", (f"JAX runs on {platform}; --config.dtype=bfloat16 "
                       "asks for mixed precision there")
  flags = cpu_tuning.cpu_flags() if flags is None else flags
  if cpu_tuning.has_amx(flags):
    return "bfloat16", ("this CPU has AMX bfloat16 matrix units (" +
                        " ".join(cpu_tuning.AMX_FLAGS) + ")")
  return "float32", ("this CPU has no AMX bfloat16 matrix units ("
                     f"{cpu_tuning.cpu_flags_phrase(flags)})")


def resolve(config: "ml_collections.ConfigDict",
            flags: frozenset[str] | None = None) -> str | None:
  """Replaces "auto" in `config.dtype` / `decode_dtype` with `choose`'s.

  Call once JAX's backend is known (it is asked for).

  Returns:
    One line for the log saying what was chosen and why, or None where
    neither field is "auto".
  """
  # A tool's own settings (the caption CLI's, evaluate's) may have neither.
  auto = [field for field in FIELDS
          if field in config and getattr(config, field) == AUTO]
  if not auto:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  name, why = choose(jax.default_backend(), flags)
  for field in auto:
    setattr(config, field, name)
  fields = " and ".join(f"config.{field}" for field in auto)
  flags = " and ".join(f"--config.{field}" for field in auto)
  verb = "override them" if len(auto) > 1 else "overrides it"
  return f"{fields} = auto: {name}, as {why}; {flags} {verb}."


def name(value: str) -> str:
  """A dtype field's value with "auto" resolved for this process."""
  if value != AUTO:
    return value
  import jax  # pylint: disable=g-import-not-at-top
  return choose(jax.default_backend())[0]
