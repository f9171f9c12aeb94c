r"""Throughput of the decoder: the training step and batched beam search.

Runs on pre-extracted features (no ResNet), at the sizes of a COCO run by
default, and prints one table:

  python benchmarks/benchmark.py
  python benchmarks/benchmark.py --batch_size=64 --beam_sizes=5

XLA flags go in the environment, before the run, and are printed in the
table's header (see benchmarks/README.md):

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/benchmark.py
"""

import functools
import os
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import jax.extend
import optax

# `python benchmarks/benchmark.py` from a checkout: the package sits one
# level up. Appended, so an installed package or PYTHONPATH comes first.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from visionspeak_jax import decoder  # pylint: disable=g-import-not-at-top
from visionspeak_jax import decoding  # pylint: disable=g-import-not-at-top
from visionspeak_jax import fast_decoder  # pylint: disable=g-import-not-at-top
from visionspeak_jax import model  # pylint: disable=g-import-not-at-top
from visionspeak_jax import vocabulary  # pylint: disable=g-import-not-at-top

_BATCH = flags.DEFINE_integer("batch_size", 32, "B of the training step.")
_REGIONS = flags.DEFINE_integer("regions", 49, "R, feature regions (7x7).")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 2048, "C, channels.")
_VOCAB = flags.DEFINE_integer("vocab_size", 10000, "V.")
_LENGTH = flags.DEFINE_integer("length", 22, "T, decoder inputs per caption.")
_EMBED = flags.DEFINE_integer("embed_dim", 512, "E.")
_HIDDEN = flags.DEFINE_integer("hidden_dim", 512, "H.")
_ATTENTION = flags.DEFINE_integer("attention_dim", 512, "A.")
_GATE = flags.DEFINE_enum("gate", "vector", decoder.GATES, "Context gate.")
_DEEP = flags.DEFINE_boolean("deep_output", True, "Paper's deep output.")
_DROPOUT = flags.DEFINE_float("dropout_rate", 0.5, "Output dropout.")
_ALPHA_C = flags.DEFINE_float("alpha_c", 1.0, "Attention loss weight.")
_STEPS = flags.DEFINE_integer("steps", 5, "Training steps per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 2048,
                                  "N of the N x N @ N x N peak matmul.")
_BEAM_BATCH = flags.DEFINE_integer("beam_batch", 64, "Images per beam batch.")
_BEAM_SIZES = flags.DEFINE_list("beam_sizes", ["3", "5"], "Beam widths.")
_BEAM_LENGTH = flags.DEFINE_integer("beam_length", 20,
                                    "max_length of the beam search.")
_BEAM_REPEATS = flags.DEFINE_integer("beam_repeats", 5,
                                     "Timed beam batches (median).")
_DECODE_DTYPES = flags.DEFINE_list(
    "decode_dtypes", ["float32", "bfloat16"],
    "config.decode_dtype values to time the beam search with.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds parameters and data.")

Params = dict[str, Any]


def forward_flops(*, batch: int, length: int, regions: int, feature_dim: int,
                  vocab_size: int, embed_dim: int, hidden_dim: int,
                  attention_dim: int, gate: str, deep_output: bool
                  ) -> dict[str, float]:
  """Matmul FLOPs (2 per multiply-add) of one teacher-forced forward pass.

  Elementwise work (tanh, softmax, the loss) is left out: it is a few
  percent of the total and runs far from the matmul peak anyway.

  Args:
    batch: B.
    length: T, decoder steps.
    regions: R.
    feature_dim: C.
    vocab_size: V.
    embed_dim: E.
    hidden_dim: H.
    attention_dim: A.
    gate: the decoder's gate kind.
    deep_output: the decoder's output kind.

  Returns:
    FLOPs per item, `once` items counted once per image, the others T times.
  """
  b, t, r, c, v = batch, length, regions, feature_dim, vocab_size
  e, h, a = embed_dim, hidden_dim, attention_dim
  items = {
      # Once per image.
      "project_features [B*R,C]@[C,A]": 2 * b * r * c * a,
      "init_h, init_c 2x [B,C]@[C,H]": 2 * 2 * b * c * h,
      # Every step.
      "attention query [B,H]@[H,A]": t * 2 * b * h * a,
      "attention scores [B,R,A]@[A]": t * 2 * b * r * a,
      "context [B,R]x[B,R,C]": t * 2 * b * r * c,
      "lstm [B,E+C+H]@[E+C+H,4H]": t * 2 * b * (e + c + h) * 4 * h,
  }
  if gate != "none":
    items["gate [B,H]@[H,C|1]"] = t * 2 * b * h * (c if gate == "vector"
                                                     else 1)
  if deep_output:
    items["deep l_h [B,H]@[H,E]"] = t * 2 * b * h * e
    items["deep l_z [B,C]@[C,E]"] = t * 2 * b * c * e
    items["output [B,E]@[E,V]"] = t * 2 * b * e * v
  else:
    items["output [B,H]@[H,V]"] = t * 2 * b * h * v
  return items


def _cost_flops(compiled: Any) -> float:
  """XLA's own FLOP count of a compiled computation (nan if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return float("nan")
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else [value]:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jax.extend.core.Jaxpr):
        found.append(item)
  return found


def jaxpr_matmul_flops(jaxpr: Any) -> float:
  """FLOPs of every dot_general in a jaxpr, scan bodies times their length.

  Counts what the traced program asks for, backward pass included, so it
  checks the analytic count without its "backward = 2 x forward" rule.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      contract = np.prod([lhs.shape[d] for d in lhs_contract])
      total += 2.0 * eqn.outvars[0].aval.size * contract
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for sub in _subjaxprs(eqn.params):
      total += times * jaxpr_matmul_flops(sub)
  return total


def _timed_compile(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _jit_compile(jitted: Any, *args: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def matmul_peak(n: int, repeats: int = 10) -> float:
  """Best float32 GFLOP/s of a jitted [n, n] @ [n, n] matmul."""
  k_a, k_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k_a, (n, n), jnp.float32)
  b = jax.random.normal(k_b, (n, n), jnp.float32)
  matmul, _ = _timed_compile(lambda x, y: x @ y, a, b)
  matmul(a, b).block_until_ready()  # Warm-up: page in buffers, threads.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e9


def random_tokens(rng: np.random.RandomState, batch: int, length: int,
                  vocab_size: int) -> np.ndarray:
  """[B, T + 1] captions: BOS, words, EOS, PAD, with random lengths."""
  tokens = np.full((batch, length + 1), vocabulary.PAD_ID, np.int32)
  tokens[:, 0] = vocabulary.BOS_ID
  for i in range(batch):
    words = rng.randint(length // 2, length)  # EOS still fits in T targets.
    tokens[i, 1:words + 1] = rng.randint(4, vocab_size, words)
    tokens[i, words + 1] = vocabulary.EOS_ID
  return tokens


def make_train_step(optimizer: optax.GradientTransformation,
                    dropout_rate: float, alpha_c: float) -> Callable[..., Any]:
  """The decoder half of train.py's step: loss, grads, optax update."""

  def loss_fn(params, features, tokens, rng):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # [B, T + 1] -> [B, T]
    mask = (targets != vocabulary.PAD_ID).astype(jnp.float32)
    logits, alphas = fast_decoder.teacher_forced(
        params, features, inputs, dropout_rate=dropout_rate, rng=rng)
    terms = decoder.loss_terms(logits, targets, mask, alphas)
    return (terms["xent_sum"] / jnp.maximum(terms["tokens"], 1.0)
            + alpha_c * terms["attention_sum"]
            / jnp.maximum(terms["captions"], 1.0))

  def train_step(params, opt_state, features, tokens, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, features, tokens, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Donated state is updated in place, as in the real training loop.
  return jax.jit(train_step, donate_argnums=(0, 1))


def make_beam_fn(beam_size: int, max_length: int) -> Callable[..., Any]:
  """`model.beam_caption` on features, returning the final BeamState.

  Takes `model.decoding_weights` (built once per checkpoint, outside the
  timed calls, as the caption CLI and evaluation do) and runs
  `model.make_step_fn` (positions, initial state, features projected once
  per image) and `decoding.beam_search_loop`, so the number of steps
  actually run can be read back.
  """

  def beam_fn(weights, features):
    step_fn, state = model.make_step_fn(weights, features)
    return decoding.beam_search_loop(
        step_fn, state, features.shape[0], beam_size, max_length,
        bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID,
        pad_id=vocabulary.PAD_ID)

  return beam_fn


def _seconds(run: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(median, best) wall time of `repeats` calls of `run`."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times)


def main(argv):
  del argv
  sizes = dict(batch=_BATCH.value, length=_LENGTH.value,
               regions=_REGIONS.value, feature_dim=_FEATURE_DIM.value,
               vocab_size=_VOCAB.value, embed_dim=_EMBED.value,
               hidden_dim=_HIDDEN.value, attention_dim=_ATTENTION.value,
               gate=_GATE.value, deep_output=_DEEP.value)
  b, t = _BATCH.value, _LENGTH.value

  def row(name, value, note=""):
    print(f"  {name:<34} {value:>14}  {note}", flush=True)

  # Wall-time numbers halve when anything else runs: say so up front.
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x "
        f"{jax.device_count()}, {os.cpu_count()} CPUs, load average "
        f"{load:.1f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"sizes: B={b} T={t} R={_REGIONS.value} C={_FEATURE_DIM.value} "
        f"V={_VOCAB.value} E={_EMBED.value} H={_HIDDEN.value} "
        f"A={_ATTENTION.value} gate={_GATE.value} deep={_DEEP.value} "
        f"dropout={_DROPOUT.value}\n")

  peak = matmul_peak(_PEAK_SIZE.value)
  n = _PEAK_SIZE.value
  row("matmul peak (GFLOP/s)", f"{peak:.1f}",
      f"f32 [{n},{n}]@[{n},{n}], best of 10")

  # Training step.
  k_params, k_feat = jax.random.split(jax.random.key(_SEED.value))
  params = decoder.init(
      k_params, vocab_size=_VOCAB.value, feature_dim=_FEATURE_DIM.value,
      embed_dim=_EMBED.value, hidden_dim=_HIDDEN.value,
      attention_dim=_ATTENTION.value, gate=_GATE.value,
      deep_output=_DEEP.value)
  optimizer = optax.adam(1e-4)
  opt_state = optimizer.init(params)
  # Post-ReLU ResNet features are non-negative.
  features = jax.nn.relu(jax.random.normal(
      k_feat, (b, _REGIONS.value, _FEATURE_DIM.value)))
  np_rng = np.random.RandomState(_SEED.value)
  tokens = jnp.asarray(random_tokens(np_rng, b, t, _VOCAB.value))
  base_rng = jax.random.key(_SEED.value + 1)

  train_step = make_train_step(optimizer, _DROPOUT.value, _ALPHA_C.value)
  compiled, compile_s = _jit_compile(train_step, params, opt_state, features,
                                     tokens, base_rng)
  row("train step compile (s)", f"{compile_s:.2f}", "lower + compile")

  step_count = 0

  def run_steps(count):
    nonlocal params, opt_state, step_count
    loss = None
    for _ in range(count):
      rng = jax.random.fold_in(base_rng, step_count)
      params, opt_state, loss = compiled(params, opt_state, features, tokens,
                                         rng)
      step_count += 1
    return loss

  first_loss = float(run_steps(2))  # Warm-up.
  if not np.isfinite(first_loss):
    raise SystemExit(f"The training step gave a non-finite loss "
                     f"({first_loss}); the benchmark sizes are broken.")
  step_s, best_s = (s / _STEPS.value for s in _seconds(
      lambda: run_steps(_STEPS.value), _REPEATS.value))
  flops_items = forward_flops(**sizes)
  forward = sum(flops_items.values())
  analytic = 3 * forward
  traced = jaxpr_matmul_flops(jax.make_jaxpr(train_step)(
      params, opt_state, features, tokens, base_rng).jaxpr)
  xla = _cost_flops(compiled)
  # XLA's cost analysis counts a while loop's body once, not once per
  # iteration, so it undercounts the scans. At T = 1 there is no loop left
  # (XLA removes one-trip loops): there its count is comparable.
  xla_t1 = _cost_flops(_jit_compile(train_step, params, opt_state, features,
                                    tokens[:, :2], base_rng)[0])
  analytic_t1 = 3 * sum(forward_flops(**dict(sizes, length=1)).values())
  row("train steps/s", f"{1 / step_s:.2f}",
      f"{step_s * 1e3:.0f} ms/step, median of {_REPEATS.value} x "
      f"{_STEPS.value} steps (best {best_s * 1e3:.0f} ms)")
  row("train tokens/s", f"{b * t / step_s:.0f}", f"B*T = {b * t} per step")
  row("step GFLOP, analytic", f"{analytic / 1e9:.2f}",
      f"3 x {forward / 1e9:.2f} forward matmul GFLOP")
  row("step GFLOP, traced dot_generals", f"{traced / 1e9:.2f}",
      f"{traced / analytic:.0%} of analytic")
  row("step GFLOP, XLA cost analysis", f"{xla / 1e9:.2f}",
      "loop bodies counted once, not x T")
  row("step GFLOP at T=1: XLA/analytic", f"{xla_t1 / 1e9:.2f}/"
      f"{analytic_t1 / 1e9:.2f}", f"{xla_t1 / analytic_t1:.0%}, no loop")
  row("train GFLOP/s (analytic)", f"{analytic / step_s / 1e9:.1f}",
      f"{analytic / step_s / 1e9 / peak:.0%} of matmul peak (best repeat "
      f"{analytic / best_s / 1e9 / peak:.0%})")

  # Beam search, with freshly initialised parameters: the trained ones have
  # learnt that EOS is the most frequent target and would end every beam
  # after two steps. A random decoder rarely emits EOS, so all steps run.
  params = decoder.init(
      k_params, vocab_size=_VOCAB.value, feature_dim=_FEATURE_DIM.value,
      embed_dim=_EMBED.value, hidden_dim=_HIDDEN.value,
      attention_dim=_ATTENTION.value, gate=_GATE.value,
      deep_output=_DEEP.value)
  beam_features = jax.nn.relu(jax.random.normal(
      jax.random.fold_in(k_feat, 1),
      (_BEAM_BATCH.value, _REGIONS.value, _FEATURE_DIM.value)))
  per_step = forward_flops(**dict(sizes, batch=1, length=1))
  once = sum(v for k, v in per_step.items() if "B*R" in k or "init" in k)
  # The LSTM's word rows are a table lookup in decoding (`word_gates`,
  # built with the decoding weights), not a per-step matmul.
  word_rows = 2 * _EMBED.value * 4 * _HIDDEN.value
  step_flops = sum(per_step.values()) - once - word_rows
  images = _BEAM_BATCH.value
  for dtype_name in _DECODE_DTYPES.value:
    prepare = functools.partial(model.decoding_weights, params, dtype_name)
    weights = jax.block_until_ready(prepare())  # Compiles.
    prepare_s, _ = _seconds(prepare, 3)
    row(f"decoding weights, {dtype_name} (ms)", f"{prepare_s * 1e3:.0f}",
        "once per checkpoint, not per batch: fused, cast, word table")
    for beam_size in [int(k) for k in _BEAM_SIZES.value]:
      length = _BEAM_LENGTH.value
      beam_fn, beam_compile_s = _timed_compile(
          make_beam_fn(beam_size, length), weights, beam_features)
      final = beam_fn(weights, beam_features)  # Warm-up.
      ran = int(final.step)
      beam_s, _ = _seconds(functools.partial(beam_fn, weights, beam_features),
                           _BEAM_REPEATS.value)
      # Features are projected once per image; the first step runs one row
      # per image (every beam is the same), the others K rows.
      flops = images * (once + (1 + (ran - 1) * beam_size) * step_flops)
      row(f"beam {beam_size} images/s, {dtype_name}", f"{images / beam_s:.1f}",
          f"batch {images}, {ran}/{length} steps ran, "
          f"{beam_s * 1e3:.0f} ms/batch, {flops / beam_s / 1e9:.0f} GFLOP/s, "
          f"compile {beam_compile_s:.1f} s")
      if ran != length:
        print(f"  warning: beam {beam_size} stopped after {ran} of {length} "
              "steps; its images/s is not comparable.")

  print("\nforward matmul GFLOP of one training step:")
  for name, value in flops_items.items():
    print(f"  {name:<34} {value / 1e9:8.3f}")


if __name__ == "__main__":
  app.run(main)
