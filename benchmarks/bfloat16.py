r"""float32 against bfloat16, in one process: what mixed precision gains here.

Three versions of each part, compiled once and then timed in turns (a few
calls of each, several rounds), so that a machine's load and clock changes
fall on all three alike:

- `float32`;
- `bfloat16, autodiff`: bfloat16 with JAX's own gradient of the decoder's
  matmuls and XLA's bfloat16 convolutions (`precision.matmul` and
  `precision.conv_general_dilated` swapped for the plain product and
  `lax.conv_general_dilated` while it is traced);
- `bfloat16`: as training runs it (`config.dtype="bfloat16"`).

The parts: the decoder's training step (`benchmark.py`'s sizes and flags),
a ResNet's forward and backward pass in training mode, and the default
run's training step (`configs/shapes.py`, one device).

  python benchmarks/bfloat16.py                       # every part: about 3 min
  python benchmarks/bfloat16.py --parts=decoder --rounds=10
  python benchmarks/bfloat16.py --parts=resnet --resnet_size=101
"""

import contextlib
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmark
from configs import shapes
from visionspeak_jax.models import captioner
from visionspeak_jax.models import precision
from visionspeak_jax.models import resnet
from visionspeak_jax.training import step as step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

_PARTS = flags.DEFINE_list("parts", ["decoder", "resnet", "shapes"],
                           "What to time: decoder, resnet, shapes.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Turns of the three versions.")
_CALLS = flags.DEFINE_integer("calls", 3, "Calls of each version per turn.")
_RESNET_SIZE = flags.DEFINE_enum("resnet_size", "50", list(resnet.SIZES),
                                 "ResNet depth of the resnet part.")
_RESNET_BATCH = flags.DEFINE_integer("resnet_batch", 4, "Its images.")
_RESNET_IMAGE_SIZE = flags.DEFINE_integer("resnet_image_size", 224,
                                          "Its image size in pixels.")

VERSIONS = ("float32", "bfloat16, autodiff", "bfloat16")


@contextlib.contextmanager
def autodiff_gradients() -> Iterator[None]:
  """Within it, the models trace JAX's own matmul gradient and XLA's convs."""
  matmul, conv = precision.matmul, precision.conv_general_dilated
  precision.matmul = precision.product
  precision.conv_general_dilated = jax.lax.conv_general_dilated
  try:
    yield
  finally:
    precision.matmul, precision.conv_general_dilated = matmul, conv


def _compiled(build: Callable[[str], Callable[[], Any]]
              ) -> dict[str, Callable[[], Any]]:
  """Each version's call, built (traced and compiled) by `build(dtype)`."""
  calls = {}
  for version in VERSIONS:
    dtype = version.split(",")[0]
    context = (autodiff_gradients() if version.endswith("autodiff")
               else contextlib.nullcontext())
    with context:
      calls[version] = build(dtype)
  return calls


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int,
                per_round: int) -> dict[str, list[float]]:
  """Seconds per call of each version, one list entry per round."""
  for call in calls.values():  # Warm-up.
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      for _ in range(per_round):
        result = call()
      jax.block_until_ready(result)
      times[name].append((time.perf_counter() - start) / per_round)
  return times


def report(title: str, times: dict[str, list[float]]) -> None:
  """One line per version: median, best and the paired ratio to float32."""
  print(f"\n{title}")
  for name, values in times.items():
    ratio = statistics.median(
        f / v for f, v in zip(times["float32"], values))
    print(f"  {name:<20} {statistics.median(values) * 1e3:9.1f} ms  (best "
          f"{min(values) * 1e3:.1f}), {ratio:.2f}x float32", flush=True)


def decoder_part() -> Callable[[str], Callable[[], Any]]:
  """The decoder's training step on features, at `benchmark.py`'s sizes."""
  sizes = benchmark.decoder_sizes()
  b, t = sizes["batch"], sizes["length"]
  params = benchmark.decoder_params(jax.random.key(0), sizes)
  features = jax.nn.relu(jax.random.normal(
      jax.random.key(1), (b, sizes["regions"], sizes["feature_dim"])))
  tokens = jnp.asarray(benchmark.random_tokens(
      np.random.RandomState(0), b, t, sizes["vocab_size"]))
  # pylint: disable=protected-access
  dropout, alpha_c = benchmark._DROPOUT.value, benchmark._ALPHA_C.value
  # pylint: enable=protected-access
  optimizer = optax.adam(1e-4)
  rng = jax.random.key(2)

  def build(dtype):
    step = benchmark.make_train_step(optimizer, dropout, alpha_c,
                                     captioner.DTYPES[dtype])
    state = [jax.tree.map(jnp.copy, params), optimizer.init(params)]
    compiled = step.lower(*state, features, tokens, rng).compile()

    def call():
      state[0], state[1], loss = compiled(*state, features, tokens, rng)
      return loss

    return call

  return build


def resnet_part() -> Callable[[str], Callable[[], Any]]:
  """A ResNet's forward and backward pass, BatchNorm in training mode."""
  size = _RESNET_IMAGE_SIZE.value
  images = jax.random.normal(jax.random.key(0),
                             (_RESNET_BATCH.value, size, size, 3))

  def build(dtype):
    model = resnet.create(_RESNET_SIZE.value,
                          dtype=captioner.DTYPES[dtype] or jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(1), images)

    def loss(params, batch_stats):
      out, _ = model.apply({"params": params, "batch_stats": batch_stats},
                           images, train=True, mutable=["batch_stats"])
      return (out["spatial"].astype(jnp.float32) ** 2).mean()

    grad = jax.jit(jax.grad(loss)).lower(
        variables["params"], variables["batch_stats"]).compile()
    return functools.partial(grad, variables["params"],
                             variables["batch_stats"])

  return build


def shapes_part() -> Callable[[str], Callable[[], Any]]:
  """The default run's training step (`configs/shapes.py`) on this process's
  devices, on random images and captions."""
  vocab = benchmark.SHAPES_VOCAB

  def build(dtype):
    config = shapes.get_config()
    config.dtype = dtype
    devices = jax.local_device_count()
    per_device = config.batch_size // devices
    params, batch_stats = jax.jit(functools.partial(
        captioner.init, config=config, vocab_size=vocab))(jax.random.key(0))
    state = [benchmark.coco_state(config, params, batch_stats)]
    p_train_step, _ = step_lib.compile_steps(config)
    np_rng = np.random.RandomState(0)
    tokens = benchmark.random_tokens(np_rng, per_device * devices,
                                     config.max_caption_length + 1, vocab)
    batch = {"image": np_rng.randint(
        0, 256, (devices, per_device, config.image_size, config.image_size,
                 3), dtype=np.uint8),
             "tokens": tokens.reshape(devices, per_device, -1)}
    batch = next(flax.jax_utils.prefetch_to_device(iter([batch]), 1))
    rng = jax.random.key(1)
    compiled = jax.jit(p_train_step, donate_argnums=(0,)).lower(
        state[0], batch, rng).compile()

    def call():
      state[0], metrics = compiled(state[0], batch, rng)
      return metrics

    return call

  return build


PARTS = {
    "decoder": ("decoder training step", decoder_part),
    "resnet": ("ResNet forward + backward", resnet_part),
    "shapes": ("the default run's training step", shapes_part),
}


def main(argv):
  del argv
  unknown = sorted(set(_PARTS.value) - set(PARTS))
  if unknown:
    raise app.UsageError(f"--parts: unknown {unknown}; choose from "
                         f"{sorted(PARTS)}.")
  print(f"jax {jax.__version__}, {cpu_tuning.cpu_model()} "
        f"({os.cpu_count()} CPUs), {cpu_tuning.cpu_flags_phrase()}, "
        f"{jax.local_device_count()} device(s), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; median of "
        f"{_ROUNDS.value} rounds x {_CALLS.value} calls")
  for part in _PARTS.value:
    title, make = PARTS[part]
    if part == "resnet":
      title += (f" (ResNet-{_RESNET_SIZE.value}, {_RESNET_BATCH.value} x "
                f"{_RESNET_IMAGE_SIZE.value} px)")
    report(title, interleaved(_compiled(make()), _ROUNDS.value,
                              _CALLS.value))


if __name__ == "__main__":
  cpu_tuning.set_cpu_xla_flags()
  app.run(main)
