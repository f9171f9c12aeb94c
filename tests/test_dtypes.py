"""`config.dtype = "auto"`: bfloat16 where the CPU has AMX, float32 elsewhere;
and the bfloat16 matmul whose backward pass multiplies in bfloat16 too."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from visionspeak_jax.models import captioner
from visionspeak_jax.models import precision
from visionspeak_jax.platform import cpu_tuning
from visionspeak_jax.platform import dtypes
from visionspeak_jax.run import checkpoint

# `lscpu` flags of the three CPU kinds the project runs on.
_ZEN4 = frozenset("avx2 avx512f avx512_bf16 avx512_vnni".split())
_XEON_AMX = frozenset(
    "avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8".split())
_XEON = frozenset("avx2 avx512f avx512_vnni".split())


@pytest.mark.parametrize("platform, flags, expected", [
    ("cpu", _XEON_AMX, "bfloat16"),
    ("cpu", _ZEN4, "float32"),
    ("cpu", _XEON, "float32"),
    ("cpu", frozenset(), "float32"),
    # AMX tiles without their bfloat16 multiply do not count.
    ("cpu", frozenset({"amx_tile", "amx_int8"}), "float32"),
    ("gpu", _XEON_AMX, "float32"),
    ("tpu", frozenset(), "float32"),
])
def test_auto_is_bfloat16_only_on_a_cpu_with_amx(platform, flags, expected):
  name, why = dtypes.choose(platform, flags)
  assert name == expected
  assert ("has AMX" in why) == (expected == "bfloat16"), why


def test_cpu_flags_come_from_cpuinfo(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) "
                     "Processor\nflags\t\t: fpu avx512_bf16 amx_bf16 "
                     "amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
  flags = cpu_tuning.cpu_flags(str(cpuinfo))
  assert flags == {"fpu", "avx512_bf16", "amx_bf16", "amx_tile"}
  assert cpu_tuning.has_amx(flags)
  assert cpu_tuning.cpu_flags_phrase(flags) == (
      "CPU flags amx_tile amx_bf16 avx512_bf16")
  assert cpu_tuning.cpu_flags(str(tmp_path / "missing")) == frozenset()
  assert not cpu_tuning.has_amx(frozenset())


def test_resolve_sets_only_the_auto_fields_and_says_why():
  config = default.get_config()
  assert config.dtype == config.decode_dtype == dtypes.AUTO
  line = dtypes.resolve(config, _XEON_AMX)
  assert config.dtype == config.decode_dtype == "bfloat16"
  assert line.startswith("config.dtype and config.decode_dtype = auto: "
                         "bfloat16, as this CPU has AMX"), line
  assert line.endswith("--config.dtype and --config.decode_dtype override "
                       "them."), line
  assert "\n" not in line
  assert dtypes.resolve(config, _ZEN4) is None  # Nothing left to resolve.
  # The settings a tool passes to `runtime.start` may have neither field.
  assert dtypes.resolve(ml_collections.ConfigDict({"cpu_devices": 0})) is None

  config = default.get_config()
  config.dtype = "bfloat16"  # Given: kept, even without AMX.
  line = dtypes.resolve(config, _ZEN4)
  assert config.dtype == "bfloat16" and config.decode_dtype == "float32"
  assert line.startswith("config.decode_dtype = auto: float32, as this CPU "
                         "has no AMX"), line
  assert "config.dtype" not in line.replace("config.decode_dtype", "")


def test_auto_reaches_the_model_as_this_machines_choice():
  expected = captioner.DTYPES[dtypes.choose(jax.default_backend())[0]]
  config = ml_collections.ConfigDict({"dtype": dtypes.AUTO})
  assert captioner.compute_dtype(config) == expected
  assert captioner.decode_dtype(dtypes.AUTO) == expected


def test_a_run_saves_the_dtypes_it_resolved(tiny_run):
  saved = checkpoint.saved_config(f"{tiny_run}/checkpoints")
  expected = dtypes.choose(jax.default_backend())[0]
  assert saved.dtype == saved.decode_dtype == expected


def _grads(w_dtype):
  k_x, k_w, k_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k_x, (4, 6, 32))
  w = jax.random.normal(k_w, (32, 48)) / 6
  g = jax.random.normal(k_g, (4, 6, 48))

  def loss(x, w):
    return (precision.matmul(x, w.astype(w_dtype)) * g).sum()

  return loss, (x, w)


def test_the_bfloat16_backward_pass_multiplies_in_bfloat16():
  loss, args = _grads(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args)
  dots = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append([v.aval.dtype for v in eqn.invars])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
          if hasattr(sub, "jaxpr"):
            visit(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub)
          elif hasattr(sub, "eqns"):
            visit(sub)

  visit(jaxpr.jaxpr)
  # The forward product and both gradient products, every one bfloat16.
  assert len(dots) == 3, dots
  assert all(d == [jnp.bfloat16, jnp.bfloat16] for d in dots), dots


def test_the_bfloat16_gradients_match_float32():
  loss, args = _grads(jnp.bfloat16)
  dx16, dw16 = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
  loss32, _ = _grads(jnp.float32)
  dx32, dw32 = jax.jit(jax.grad(loss32, argnums=(0, 1)))(*args)
  # The gradients reach float32 inputs and parameters as float32.
  assert dx16.dtype == dw16.dtype == jnp.float32
  for low, high in ((dx16, dx32), (dw16, dw32)):
    error = np.linalg.norm(low - high) / np.linalg.norm(high)
    assert 1e-4 < error < 0.02, error  # Rounded to bfloat16, not float32.


def test_float32_weights_take_the_plain_product():
  loss, args = _grads(jnp.float32)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args))
  assert "custom_vjp" not in jaxpr and "bf16" not in jaxpr


def _primitives(fn, *args):
  return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


@pytest.mark.parametrize("strides, padding", [
    ((1, 1), "SAME"), ((2, 2), "SAME"), ((2, 2), ((0, 0), (0, 0))),
    ((1, 1), "VALID")])
def test_bfloat16_pointwise_convolutions_are_matmuls(strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 32)).astype(jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(1), (1, 1, 32, 24)) / 6).astype(
      jnp.bfloat16)
  dims = ("NHWC", "HWIO", "NHWC")

  def ours(x, w):
    return precision.conv_general_dilated(x, w, strides, padding,
                                          dimension_numbers=dims)

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=dims)

  got, want = ours(x, w), lax_conv(x, w)
  assert got.shape == want.shape and got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0.02,
                             atol=0.02)
  assert "conv_general_dilated" not in _primitives(ours, x, w)
  # Its gradients multiply in bfloat16 too (the matmul's backward pass).
  grads = jax.grad(lambda x, w: ours(x, w).astype(jnp.float32).sum(),
                   argnums=(0, 1))
  assert "conv_general_dilated" not in _primitives(grads, x, w)


def test_other_convolutions_are_xlas():
  dims = ("NHWC", "HWIO", "NHWC")
  x = jnp.ones((2, 8, 8, 4))
  for lhs, rhs in ((x, jnp.ones((1, 1, 4, 8))),  # float32: XLA's.
                   (x.astype(jnp.bfloat16),  # 3x3: XLA's.
                    jnp.ones((3, 3, 4, 8), jnp.bfloat16))):
    ours = jax.make_jaxpr(lambda a, b: precision.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=dims))(lhs, rhs)
    theirs = jax.make_jaxpr(lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=dims))(lhs, rhs)
    assert str(ours) == str(theirs)
