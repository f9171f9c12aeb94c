r"""Throughput of the captioner: matmul peak, COCO step, decoder, input.

Prints one table with these sections:

- the machine's matmul peak in float32 and bfloat16;
- the end-to-end COCO training step: `step.compile_steps` of
  `configs/coco.py` (ResNet-101 at 224 px, the 512-d decoder) on random
  images and captions, encoder frozen and fine-tuned, float32 and bfloat16,
  with images/s and model FLOP utilisation;
- the default run's training step (`configs/shapes.py`: the tiny ResNet
  and its small decoder), float32 and bfloat16;
- the decoder alone on pre-extracted features: its training step and
  batched beam search;
- the input pipeline alone (JPEG decode, resize, tokenise) on the
  `coco_rehearsal` set, on one thread and on all cores. Only this part needs
  TensorFlow; without it the section is skipped.

  python benchmarks/benchmark.py
  python benchmarks/benchmark.py --coco_batch=4 --coco_steps=2 \
      --pipeline_dataset=coco_rehearsal/tiny
  python benchmarks/benchmark.py --batch_size=64 --beam_sizes=5

XLA flags go in the environment, before the run, and are printed in the
table's header with those every run adds (`cpu_tuning.CPU_XLA_FLAGS`; see
benchmarks/README.md):

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python benchmarks/benchmark.py

Nothing here imports TensorFlow at the top level: on an accelerator image
with JAX but no TensorFlow (benchmarks/gpu.sh) every section but the input
pipeline runs.
"""

import functools
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

# `python benchmarks/benchmark.py` from a checkout: the package sits one
# level up. Appended, so an installed package or PYTHONPATH comes first.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

from absl import app
from absl import flags
from absl import logging
import flax.jax_utils
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

from configs import coco
from configs import coco_14x14
from configs import coco_finetune
from configs import shapes
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoder
from visionspeak_jax.models import decoding
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.models import resnet
from visionspeak_jax.text import vocabulary
from visionspeak_jax.training import optimizer as optimizer_lib
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib
# pylint: enable=g-import-not-at-top

# The end-to-end variants: the config module of each (the encoder frozen
# or fine-tuned at 0.025; 7x7 regions at 224 px, or 14x14 at 448 px).
COCO_VARIANTS = {"frozen": coco, "finetune": coco_finetune,
                 "frozen_14x14": coco_14x14}

_BATCH = flags.DEFINE_integer("batch_size", 32, "B of the training step.")
_REGIONS = flags.DEFINE_integer("regions", 49, "R, feature regions (7x7).")
_EXTRA_REGIONS = flags.DEFINE_list(
    "extra_regions", ["196"],
    "Further R to time the decoder step and beam search at, after --regions "
    "(196: 14x14, configs/coco_14x14.py); empty skips.")
_FEATURE_DIM = flags.DEFINE_integer("feature_dim", 2048, "C, channels.")
_VOCAB = flags.DEFINE_integer("vocab_size", 10000,
                               "V, of the decoder and the COCO step.")
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
_DECODER_STEP = flags.DEFINE_boolean(
    "decoder_step", True, "Time the decoder's training step on features.")
_PEAK_SIZE = flags.DEFINE_integer(
    "peak_size", None, "N of the N x N @ N x N peak matmul (default 2048 on "
    "CPU, 8192 on accelerators, where 2048 is too short to time).")
_BEAM_BATCH = flags.DEFINE_integer("beam_batch", 64, "Images per beam batch.")
_BEAM_SIZES = flags.DEFINE_list("beam_sizes", ["3", "5"], "Beam widths.")
_BEAM_LENGTH = flags.DEFINE_integer("beam_length", 20,
                                    "max_length of the beam search.")
_BEAM_REPEATS = flags.DEFINE_integer("beam_repeats", 5,
                                     "Timed beam batches (median).")
_DECODE_DTYPES = flags.DEFINE_list(
    "decode_dtypes", ["float32", "bfloat16"],
    "config.decode_dtype values to time the beam search with.")
_COCO_VARIANTS = flags.DEFINE_list(
    "coco_variants", list(COCO_VARIANTS),
    "End-to-end COCO step variants: frozen (configs/coco.py, "
    "lr_mults.encoder=0), finetune (configs/coco_finetune.py, 0.025), "
    "frozen_14x14 (configs/coco_14x14.py: 448 px, 14x14 regions); empty "
    "skips the section.")
_COCO_DTYPES = flags.DEFINE_list(
    "coco_dtypes", ["float32", "bfloat16"],
    "config.dtype values of the end-to-end COCO step.")
_COCO_BATCH = flags.DEFINE_integer(
    "coco_batch", coco.PER_DEVICE_IMAGES,
    "Images per device of the COCO step (the global batch is this times the "
    "local device count).")
_COCO_IMAGE_SIZE = flags.DEFINE_integer(
    "coco_image_size", 0,
    "config.image_size of the COCO step; 0 keeps each variant's config's "
    "(224 px, 448 px at 14x14).")
_COCO_RESNET = flags.DEFINE_enum("coco_resnet", "101", list(resnet.SIZES),
                                 "config.model.resnet_size of the COCO step.")
_COCO_STEPS = flags.DEFINE_integer("coco_steps", 3,
                                   "COCO steps per timed repeat.")
_COCO_REPEATS = flags.DEFINE_integer("coco_repeats", 3,
                                     "Timed COCO repeats (median).")
_SHAPES_DTYPES = flags.DEFINE_list(
    "shapes_dtypes", ["float32", "bfloat16"],
    "config.dtype values of the default run's step (configs/shapes.py); "
    "empty skips it.")
_SHAPES_STEPS = flags.DEFINE_integer("shapes_steps", 20,
                                     "Shapes steps per timed repeat.")
_PIPELINE_DATASET = flags.DEFINE_string(
    "pipeline_dataset", "coco_rehearsal/2014",
    "TFDS set of the input pipeline section (coco_rehearsal/2014: built on "
    "first use, about 40 s and 900 MB; coco_rehearsal/tiny for quick runs; "
    "coco_captions/2014 if prepared); empty skips the section.")
_PIPELINE_DATA_DIR = flags.DEFINE_string(
    "pipeline_data_dir", "", "Its TFDS data_dir; empty is TFDS's default "
    "(~/tensorflow_datasets).")
_PIPELINE_BATCHES = flags.DEFINE_integer(
    "pipeline_batches", 60, "Timed batches (of configs/coco.py's 8 images) "
    "per pipeline run.")
_PIPELINE_SHUFFLE = flags.DEFINE_integer(
    "pipeline_shuffle_buffer", 1000,
    "config.shuffle_buffer_size of the pipeline runs (see README).")
_FEED_RATE = flags.DEFINE_float(
    "feed_rate", 0.0,
    "Images/s of one accelerator that the host cores must feed; 0 takes "
    "this run's frozen bfloat16 COCO step.")
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


def _conv_flops(eqn: Any) -> float:
  """Useful FLOPs of one conv_general_dilated: zeros of lhs dilation skipped.

  A strided convolution's input gradient is a convolution over its output
  gradient dilated by the stride (zeros between the values); counting those
  zeros would charge it stride^2 times the forward's FLOPs, which no
  convolution library spends.
  """
  rhs = eqn.invars[1].aval
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
  window = np.prod([rhs.shape[d] for d in rhs_spec[2:]])
  contract = window * rhs.shape[rhs_spec[1]]
  dilation = np.prod(eqn.params["lhs_dilation"])
  return 2.0 * eqn.outvars[0].aval.size * contract / dilation


def jaxpr_flops(jaxpr: Any, loops: bool = True) -> dict[str, float]:
  """FLOPs of every dot_general and convolution in a jaxpr, by kind.

  Counts what the traced program asks for, backward pass included. A
  mapped body (`pmap`, `shard_map`) has per-device shapes, so a mapped step
  counts one device's work.

  Args:
    jaxpr: the jaxpr (`jax.make_jaxpr(fn)(...).jaxpr`).
    loops: multiply scan bodies by their length; False counts them once,
      as XLA's cost analysis does.

  Returns:
    {"dot": FLOPs of dot_generals, "conv": FLOPs of convolutions}.
  """
  total = {"dot": 0.0, "conv": 0.0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      contract = np.prod([lhs.shape[d] for d in lhs_contract])
      total["dot"] += 2.0 * eqn.outvars[0].aval.size * contract
    elif name == "conv_general_dilated":
      total["conv"] += _conv_flops(eqn)
    times = eqn.params["length"] if name == "scan" and loops else 1
    subs = [jaxpr_flops(sub, loops) for sub in _subjaxprs(eqn.params)]
    if name == "cond" and subs:  # One branch runs: count the dearest.
      subs = [max(subs, key=lambda s: s["dot"] + s["conv"])]
    for sub in subs:
      for kind, value in sub.items():
        total[kind] += times * value
  return total


def jaxpr_matmul_flops(jaxpr: Any) -> float:
  """FLOPs of every dot_general in a jaxpr, scan bodies times their length.

  Counts what the traced program asks for, backward pass included, so it
  checks the analytic count without its "backward = 2 x forward" rule.
  """
  return jaxpr_flops(jaxpr)["dot"]


def _timed_compile(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _jit_compile(jitted: Any, *args: Any) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def matmul_peak(n: int, repeats: int = 10, dtype: Any = jnp.float32
                ) -> float:
  """Best GFLOP/s of a jitted [n, n] @ [n, n] matmul with `dtype` inputs.

  Products are summed in float32 (`preferred_element_type`), as the
  decoder's bfloat16 matmuls do.
  """
  k_a, k_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k_b, (n, n), jnp.float32).astype(dtype)
  matmul, _ = _timed_compile(
      lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32), a, b)
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
                    dropout_rate: float, alpha_c: float,
                    dtype: Any = None) -> Callable[..., Any]:
  """The decoder half of the training step: its loss, grads, optax update.

  `dtype` is `teacher_forced`'s matmul input dtype: None (float32) or
  bfloat16 for `config.dtype="bfloat16"`'s mixed precision.
  """

  def loss_fn(params, features, tokens, rng):
    # [B, T + 1] -> [B, T] each.
    inputs, targets, mask = step_lib.split_tokens(tokens)
    logits, alphas, _ = fast_decoder.teacher_forced(
        params, features, inputs, dropout_rate=dropout_rate, rng=rng,
        dtype=dtype)
    terms = decoder.loss_terms(logits, targets, mask, alphas)
    return decoder.loss(terms, alpha_c, terms["tokens"], terms["captions"])

  def train_step(params, opt_state, features, tokens, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, features, tokens, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Donated state is updated in place, as in the real training loop.
  return jax.jit(train_step, donate_argnums=(0, 1))


def recurrence_flops(*, batch: int, length: int, regions: int,
                     feature_dim: int, hidden_dim: int, attention_dim: int,
                     gate: str, **unused: Any) -> float:
  """Matmul FLOPs of the recurrence's forward and backward pass.

  The part of `forward_flops` that `fast_decoder._recurrence` runs inside
  its scan (the fused matmul on h, the context rows of the LSTM weight, the
  attention scores and context), times 3 as there.
  """
  del unused
  b, r, c, h, a = batch, regions, feature_dim, hidden_dim, attention_dim
  g = {"vector": c, "scalar": 1}.get(gate, 0)
  per_step = (2 * b * h * (a + g + 4 * h) + 2 * b * c * 4 * h
              + 2 * b * r * a + 2 * b * r * c)
  return 3 * length * per_step


def time_recurrence(params: Params, features: jax.Array, length: int,
                    repeats: int) -> float:
  """Median seconds of the recurrence alone: forward, backward, weight grads.

  `fast_decoder._recurrence` on the step's weights and features, with a
  random embedding input, differentiated with respect to everything the
  training step differentiates it for.
  """
  # pylint: disable=protected-access
  fused = fast_decoder.fused_weights(params)
  features_proj = decoder.project_features(params, features)
  carry = decoder.init_state(params, features)
  attention_dim, gate_dim = fast_decoder._dims(fused.vectors)
  z_emb = jax.random.normal(jax.random.key(0),
                            (length,) + carry[0].shape[:1]
                            + fused.lstm_b.shape)

  def loss(w_h, w_ctx, vectors, features_proj, z_emb):
    hs, contexts, alphas, _ = fast_decoder._recurrence(
        attention_dim, gate_dim, w_h, w_ctx, vectors, features, features_proj,
        z_emb, carry, None)
    return hs.sum() + contexts.sum() + (alphas ** 2).sum()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  args = (fused.w_h, fused.w_ctx, fused.vectors, features_proj, z_emb)
  jax.block_until_ready(grad(*args))  # Compile and warm up.
  return _seconds(lambda: grad(*args), repeats)[0]
  # pylint: enable=protected-access


class Matmul(NamedTuple):
  """One matmul of the decoder's training step, for `time_matmul`.

  `einsum(spec, lhs, rhs)`; with `steps`, the lhs gets a leading [steps]
  axis and a `lax.scan` runs one product per step on the same rhs, as the
  recurrence does.
  """
  name: str
  spec: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  steps: int = 0


def _einsum_sizes(m: Matmul) -> dict[str, int]:
  operands = m.spec.split("->")[0].split(",")
  return {**dict(zip(operands[0], m.lhs)), **dict(zip(operands[1], m.rhs))}


def matmul_flops(m: Matmul) -> float:
  """2 x the product of every index size (x steps): multiply-adds x 2."""
  return 2.0 * float(np.prod(list(_einsum_sizes(m).values()))) * max(
      m.steps, 1)


def step_matmuls(*, batch: int, length: int, regions: int, feature_dim: int,
                 vocab_size: int, embed_dim: int, hidden_dim: int,
                 attention_dim: int, gate: str, deep_output: bool
                 ) -> list[Matmul]:
  """Every matmul the decoder's training step runs, forward and backward.

  As `teacher_forced` and `make_train_step` arrange them: the work on all
  B x T rows at once, the recurrence's four products per step on M = B rows
  and the attention's two mixes of the features (scans), and its two
  weight gradients after it. The features are an input of this step, so
  their gradients are not computed; the attention scores ([B,R,A]@[A],
  elementwise-sized) are left out.
  """
  b, t, r, c, v = batch, length, regions, feature_dim, vocab_size
  e, h, a = embed_dim, hidden_dim, attention_dim
  n = b * t
  g = {"vector": c, "scalar": 1}.get(gate, 0)
  fused = a + g + 4 * h  # The fused matmul on h: query, gate, LSTM rows.

  def dense(name, m, k, out):  # x [m, k] @ w [k, out]: forward, dx, dw.
    return [Matmul(name, "mk,kn->mn", (m, k), (k, out)),
            Matmul(name + " dx", "mn,kn->mk", (m, out), (k, out)),
            Matmul(name + " dw", "mk,mn->kn", (m, k), (m, out))]

  items = dense("LSTM embedding rows", n, e, 4 * h)
  # The features have no gradient here: forward and weight gradient only.
  items += [Matmul("project_features", "mk,kn->mn", (b * r, c), (c, a)),
            Matmul("project_features dw", "mk,mn->kn", (b * r, c), (b * r, a))]
  for name in ("init_h", "init_c"):
    items += [Matmul(name, "mk,kn->mn", (b, c), (c, h)),
              Matmul(name + " dw", "mk,mn->kn", (b, c), (b, h))]
  if deep_output:
    items += (dense("deep l_h", n, h, e) + dense("deep l_z", n, c, e)
              + dense("output", n, e, v))
  else:
    items += dense("output", n, h, v)
  items += [
      # The recurrence: one product per step on the step's B rows.
      Matmul("scan: h @ w_h", "mk,kn->mn", (b, h), (h, fused), t),
      Matmul("scan: context @ w_ctx", "mk,kn->mn", (b, c), (c, 4 * h), t),
      Matmul("scan: d @ w_h^T", "mn,kn->mk", (b, fused), (h, fused), t),
      Matmul("scan: d @ w_ctx^T", "mn,kn->mk", (b, 4 * h), (c, 4 * h), t),
      Matmul("scan: context", "br,brc->bc", (b, r), (b, r, c), t),
      Matmul("scan: d alpha", "bc,brc->br", (b, c), (b, r, c), t),
      # Its weight gradients, one matmul over all steps each.
      Matmul("w_h dw", "mk,mn->kn", (n, h), (n, fused)),
      Matmul("w_ctx dw", "mk,mn->kn", (n, c), (n, 4 * h)),
  ]
  return items


def time_matmul(m: Matmul, repeats: int) -> float:
  """Median seconds of `m` alone, jitted, on random float32 inputs."""
  k_lhs, k_rhs = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(k_lhs, ((m.steps,) if m.steps else ()) + m.lhs)
  rhs = jax.random.normal(k_rhs, m.rhs)
  if m.steps:  # One product per step, its outputs stacked, as in a scan.
    fn = jax.jit(lambda xs, y: jax.lax.scan(
        lambda _, x: (None, jnp.einsum(m.spec, x, y)), None, xs)[1])
  else:
    fn = jax.jit(functools.partial(jnp.einsum, m.spec))
  jax.block_until_ready(fn(lhs, rhs))  # Compile and warm up.
  return _seconds(lambda: fn(lhs, rhs), repeats)[0]


def time_adam(optimizer: optax.GradientTransformation, params: Params,
              repeats: int) -> float:
  """Median seconds of one optimizer update and its application, alone.

  Parameters and optimizer state are donated and returned in the order they
  come in, as in the training step: JAX pairs donated buffers with outputs
  of the same shape in order, and a mismatch would add a copy of each.
  """

  def update(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)  # The caller keeps its own.
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  opt_state = optimizer.init(params)

  def run():
    nonlocal params, opt_state
    params, opt_state = update(params, opt_state, grads)
    return params

  jax.block_until_ready(run())  # Compile and warm up.
  return _seconds(run, repeats)[0]


def make_beam_fn(beam_size: int, max_length: int) -> Callable[..., Any]:
  """`captioner.beam_caption` on features, returning the final BeamState.

  Takes `captioner.decoding_weights` (built once per checkpoint, outside the
  timed calls, as the caption CLI and evaluation do) and runs
  `captioner.make_step_fn` (positions, initial state, features projected once
  per image) and `decoding.beam_search_loop`, so the number of steps
  actually run can be read back.
  """

  def beam_fn(weights, features):
    step_fn, state = captioner.make_step_fn(weights, features)
    return decoding.beam_search_loop(
        step_fn, state, features.shape[0], beam_size, max_length,
        bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID,
        pad_id=vocabulary.PAD_ID)

  return beam_fn


def _minor_faults() -> int:
  """This process's minor page faults so far (0 where not reported)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # Not Unix.
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _seconds(run: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(median, best) wall time of `repeats` calls of `run`."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times)


def row(name: str, value: Any, note: str = "") -> None:
  """Prints one line of the table."""
  print(f"  {name:<34} {value:>14}  {note}", flush=True)


def decoder_sizes() -> dict[str, Any]:
  """The decoder sizes the flags ask for: `forward_flops`'s arguments."""
  return dict(batch=_BATCH.value, length=_LENGTH.value,
              regions=_REGIONS.value, feature_dim=_FEATURE_DIM.value,
              vocab_size=_VOCAB.value, embed_dim=_EMBED.value,
              hidden_dim=_HIDDEN.value, attention_dim=_ATTENTION.value,
              gate=_GATE.value, deep_output=_DEEP.value)


def decoder_params(key: jax.Array, sizes: dict[str, Any]) -> Params:
  """`decoder.init` at `decoder_sizes`."""
  return decoder.init(
      key, vocab_size=sizes["vocab_size"], feature_dim=sizes["feature_dim"],
      embed_dim=sizes["embed_dim"], hidden_dim=sizes["hidden_dim"],
      attention_dim=sizes["attention_dim"], gate=sizes["gate"],
      deep_output=sizes["deep_output"])


def decoder_step_section(*, sizes: dict[str, Any], dropout_rate: float,
                         alpha_c: float, steps: int, repeats: int, seed: int,
                         peak: float, bf16_peak: float | None = None
                         ) -> dict[str, float]:
  """Times the decoder's training step on features and prints its rows.

  Args:
    sizes: `forward_flops`'s keyword arguments.
    dropout_rate: output dropout.
    alpha_c: attention loss weight.
    steps: steps per timed repeat.
    repeats: timed repeats (median).
    seed: seeds parameters and data.
    peak: float32 matmul GFLOP/s, for the share of peak.
    bf16_peak: bfloat16 matmul GFLOP/s; given, the step is also timed in
      mixed precision (bfloat16 matmul inputs, float32 sums) against it.

  Returns:
    The forward matmul FLOPs per item (`forward_flops`).
  """
  b, t = sizes["batch"], sizes["length"]
  k_params, k_feat = jax.random.split(jax.random.key(seed))
  params = decoder_params(k_params, sizes)
  optimizer = optax.adam(1e-4)
  opt_state = optimizer.init(params)
  # Post-ReLU ResNet features are non-negative.
  features = jax.nn.relu(jax.random.normal(
      k_feat, (b, sizes["regions"], sizes["feature_dim"])))
  np_rng = np.random.RandomState(seed)
  tokens = jnp.asarray(random_tokens(np_rng, b, t, sizes["vocab_size"]))
  base_rng = jax.random.key(seed + 1)

  train_step = make_train_step(optimizer, dropout_rate, alpha_c)
  compiled, compile_s = _jit_compile(train_step, params, opt_state, features,
                                     tokens, base_rng)
  row("train step compile (s)", f"{compile_s:.2f}", "lower + compile")

  step_count = 0

  def run_steps(count, step_fn=compiled):
    nonlocal params, opt_state, step_count
    loss = None
    for _ in range(count):
      rng = jax.random.fold_in(base_rng, step_count)
      params, opt_state, loss = step_fn(params, opt_state, features, tokens,
                                        rng)
      step_count += 1
    return loss

  first_loss = float(run_steps(2))  # Warm-up.
  if not np.isfinite(first_loss):
    raise SystemExit(f"The training step gave a non-finite loss "
                     f"({first_loss}); the benchmark sizes are broken.")
  faults = _minor_faults()
  step_s, best_s = (s / steps for s in _seconds(
      lambda: run_steps(steps), repeats))
  faults = (_minor_faults() - faults) / (steps * repeats)
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
      f"{step_s * 1e3:.0f} ms/step, median of {repeats} x "
      f"{steps} steps (best {best_s * 1e3:.0f} ms)")
  row("train tokens/s", f"{b * t / step_s:.0f}", f"B*T = {b * t} per step")
  row("minor page faults per step", f"{faults:.0f}",
      "XLA's temporaries, mapped afresh at every call (cpu_tuning.py)")
  row("step GFLOP, analytic", f"{analytic / 1e9:.2f}",
      f"3 x {forward / 1e9:.2f} forward matmul GFLOP")
  row("step GFLOP, traced dot_generals", f"{traced / 1e9:.2f}",
      f"{traced / analytic:.0%} of analytic")
  row("step GFLOP, XLA cost analysis", f"{xla / 1e9:.2f}",
      "loop bodies counted once, not x T")
  row("step GFLOP at T=1: XLA/analytic", f"{xla_t1 / 1e9:.2f}/"
      f"{analytic_t1 / 1e9:.2f}", f"{xla_t1 / analytic_t1:.0%}, no loop")
  row("train GFLOP/s (analytic)", f"{analytic / step_s / 1e9:.1f}",
      f"{analytic / step_s / 1e9 / peak:.0%} of f32 matmul peak (best "
      f"repeat {analytic / best_s / 1e9 / peak:.0%})")
  # The scan is the part that cannot batch over time: M = B rows per matmul.
  rec_s = time_recurrence(params, features, t, repeats)
  rec_flops = recurrence_flops(**sizes)
  row("of which the recurrence (ms)", f"{rec_s * 1e3:.0f}",
      f"its scan forward + backward, alone: {rec_flops / 1e9:.1f} GFLOP at "
      f"{rec_flops / rec_s / 1e9:.0f} GFLOP/s, "
      f"{rec_flops / rec_s / 1e9 / peak:.0%} of peak")
  rest_s = max(step_s - rec_s, 1e-9)  # Tiny sizes: timing noise.
  row("the rest of the step (ms)", f"{rest_s * 1e3:.0f}",
      f"step - recurrence: {(analytic - rec_flops) / 1e9:.1f} GFLOP at "
      f"{(analytic - rec_flops) / rest_s / 1e9:.0f} GFLOP/s, "
      f"{(analytic - rec_flops) / rest_s / 1e9 / peak:.0%} of peak")
  # The ceiling: every matmul of the step timed alone, and Adam alone.
  matmuls = step_matmuls(**sizes)
  times = [time_matmul(m, repeats) for m in matmuls]
  matmul_s = sum(times)
  flops = sum(matmul_flops(m) for m in matmuls)
  # The one that loses the most time against the peak.
  worst, worst_s = max(zip(matmuls, times),
                       key=lambda mt: mt[1] - matmul_flops(mt[0]) / peak / 1e9)
  row("its matmuls alone, summed (ms)", f"{matmul_s * 1e3:.0f}",
      f"{len(matmuls)} matmuls, {flops / 1e9:.1f} GFLOP at "
      f"{flops / matmul_s / 1e9:.0f} GFLOP/s; furthest from the peak: "
      f"{worst.name}, {worst_s * 1e3:.1f} ms at "
      f"{matmul_flops(worst) / worst_s / 1e9:.0f} GFLOP/s")
  adam_s = time_adam(optimizer, params, repeats)
  size = sum(x.size for x in jax.tree.leaves(params))
  row("the Adam update alone (ms)", f"{adam_s * 1e3:.1f}",
      f"{size / 1e6:.1f} M parameters, memory-bound")
  ceiling = analytic / (matmul_s + adam_s) / 1e9 / peak
  row("ceiling: share of peak", f"{ceiling:.0%}",
      "the analytic FLOPs in the time of those matmuls and Adam: the step "
      "if nothing else took time")
  if bf16_peak:
    # Mixed precision, as `config.dtype="bfloat16"` trains: the same FLOPs,
    # against the bfloat16 peak.
    compiled_bf16, compile_s = _jit_compile(
        make_train_step(optimizer, dropout_rate, alpha_c, jnp.bfloat16),
        params, opt_state, features, tokens, base_rng)
    run_steps(2, compiled_bf16)  # Warm-up.
    bf16_s, bf16_best = (s / steps for s in _seconds(
        lambda: run_steps(steps, compiled_bf16), repeats))
    row("train steps/s, bfloat16", f"{1 / bf16_s:.2f}",
        f"{bf16_s * 1e3:.0f} ms/step (best {bf16_best * 1e3:.0f} ms), "
        f"{step_s / bf16_s:.2f}x float32; compile {compile_s:.1f} s")
    row("train GFLOP/s, bfloat16", f"{analytic / bf16_s / 1e9:.1f}",
        f"{analytic / bf16_s / 1e9 / bf16_peak:.0%} of bf16 matmul peak, "
        f"{analytic / bf16_s / 1e9 / peak:.0%} of f32")
  return flops_items


def beam_section(*, sizes: dict[str, Any], beam_batch: int,
                 beam_sizes: list[int], beam_length: int, beam_repeats: int,
                 decode_dtypes: list[str], seed: int) -> None:
  """Times batched beam search on random features and prints its rows.

  Args:
    sizes: `forward_flops`'s keyword arguments (`batch` and `length` unused).
    beam_batch: images per beam batch.
    beam_sizes: beam widths.
    beam_length: max_length of the search.
    beam_repeats: timed beam batches (median).
    decode_dtypes: `config.decode_dtype` values.
    seed: seeds parameters and features.
  """
  # Freshly initialised parameters: trained ones have learnt that EOS is the
  # most frequent target and would end every beam after two steps. A random
  # decoder rarely emits EOS, so all steps run.
  k_params, k_feat = jax.random.split(jax.random.key(seed))
  params = decoder_params(k_params, sizes)
  beam_features = jax.nn.relu(jax.random.normal(
      jax.random.fold_in(k_feat, 1),
      (beam_batch, sizes["regions"], sizes["feature_dim"])))
  per_step = forward_flops(**dict(sizes, batch=1, length=1))
  once = sum(v for k, v in per_step.items() if "B*R" in k or "init" in k)
  # The LSTM's word rows are a table lookup in decoding (`word_gates`,
  # built with the decoding weights), not a per-step matmul.
  word_rows = 2 * sizes["embed_dim"] * 4 * sizes["hidden_dim"]
  step_flops = sum(per_step.values()) - once - word_rows
  images = beam_batch
  for dtype_name in decode_dtypes:
    prepare = functools.partial(captioner.decoding_weights, params, dtype_name)
    weights = jax.block_until_ready(prepare())  # Compiles.
    prepare_s, _ = _seconds(prepare, 3)
    row(f"decoding weights, {dtype_name} (ms)", f"{prepare_s * 1e3:.0f}",
        "once per checkpoint, not per batch: fused, cast, word table")
    for beam_size in beam_sizes:
      beam_fn, beam_compile_s = _timed_compile(
          make_beam_fn(beam_size, beam_length), weights, beam_features)
      final = beam_fn(weights, beam_features)  # Warm-up.
      ran = int(final.step)
      beam_s, _ = _seconds(functools.partial(beam_fn, weights, beam_features),
                           beam_repeats)
      # Features are projected once per image; the first step runs one row
      # per image (every beam is the same), the others K rows.
      flops = images * (once + (1 + (ran - 1) * beam_size) * step_flops)
      row(f"beam {beam_size} images/s, {dtype_name}", f"{images / beam_s:.1f}",
          f"batch {images}, {ran}/{beam_length} steps ran, "
          f"{beam_s * 1e3:.0f} ms/batch, {flops / beam_s / 1e9:.0f} GFLOP/s, "
          f"compile {beam_compile_s:.1f} s")
      if ran != beam_length:
        print(f"  warning: beam {beam_size} stopped after {ran} of "
              f"{beam_length} steps; its images/s is not comparable.")


def coco_config(variant: str, dtype_name: str, *, per_device_batch: int,
                image_size: int, resnet_size: str) -> Any:
  """The config of one end-to-end variant on this process's devices.

  Args:
    variant: a `COCO_VARIANTS` key: its config module sets
      `lr_mults.encoder`.
    dtype_name: `config.dtype`.
    per_device_batch: images per device.
    image_size: `config.image_size`; 0 keeps the config's.
    resnet_size: `config.model.resnet_size`.

  Returns:
    The config, its global batch `per_device_batch` x local devices.
  """
  devices = jax.local_device_count()
  config = COCO_VARIANTS[variant].get_config(str(devices))
  config.batch_size = per_device_batch * devices
  config.image_size = image_size or config.image_size
  config.model.resnet_size = resnet_size
  config.dtype = dtype_name
  return config


def coco_state(config: Any, params: Params, batch_stats: Any
               ) -> state_lib.TrainState:
  """`state.create_train_state`'s state at step 0, around copies of `params`.

  The random parameters are drawn once for every variant, as neither the
  dtype nor `lr_mults` changes them (ResNet-101's random init takes half a
  minute on a CPU); copies, because the step donates its state.
  """
  params, batch_stats = jax.tree.map(jnp.copy, (params, batch_stats))
  state = state_lib.TrainState.create(
      apply_fn=None, params=params,
      tx=optimizer_lib.create(config, list(params)), batch_stats=batch_stats)
  return state.replace(step=jnp.zeros((), jnp.int32))


def time_coco_step(config: Any, params: Params, batch_stats: Any, *,
                   vocab_size: int, steps: int, repeats: int, seed: int
                   ) -> dict[str, float]:
  """Times `step.compile_steps(config)`'s train step on random inputs.

  The batch (uint8 images and captions of `config.max_caption_length`
  words) is placed on the devices once, as `prefetch_to_device` does in
  training, so the time is the step's alone.

  Args:
    config: the run config (`coco_config`).
    params: `captioner.init`'s parameters for `config` (copied, not consumed).
    batch_stats: and its BatchNorm statistics.
    vocab_size: V.
    steps: steps per timed repeat.
    repeats: timed repeats.
    seed: seeds the data.

  Returns:
    `step_s` (median) and `best_s` seconds per step, `compile_s`, and
    per-device FLOPs of one step: `dot`, `conv` (scans times their length),
    `once` (scan bodies once) and `xla` (XLA's cost analysis, loop bodies
    once).
  """
  devices = jax.local_device_count()
  per_device = config.batch_size // devices
  size = config.image_size
  state = coco_state(config, params, batch_stats)
  p_train_step, _ = step_lib.compile_steps(config)
  np_rng = np.random.RandomState(seed)
  # `captions_per_image` K references per image: [devices, b, K, T + 1].
  per_image = config.captions_per_image
  tokens = random_tokens(np_rng, config.batch_size * per_image,
                         config.max_caption_length + 1, vocab_size)
  batch = {"image": np_rng.randint(0, 256, (devices, per_device, size, size, 3),
                                   dtype=np.uint8),
           "tokens": tokens.reshape(devices, per_device, per_image, -1)
                     if per_image > 1 else
                     tokens.reshape(devices, per_device, -1)}
  batch = next(flax.jax_utils.prefetch_to_device(iter([batch]), 1))
  base_rng = jax.random.key(seed + 1)
  jaxpr = jax.make_jaxpr(p_train_step)(state, batch, base_rng).jaxpr
  flops = jaxpr_flops(jaxpr)
  once = jaxpr_flops(jaxpr, loops=False)
  compiled, compile_s = _jit_compile(p_train_step, state, batch, base_rng)

  def run(count):
    nonlocal state
    metrics = None
    for _ in range(count):
      state, metrics = compiled(state, batch, base_rng)
    return metrics

  loss = float(run(2)["loss"])  # Warm-up.
  if not np.isfinite(loss):
    raise SystemExit(f"The COCO step gave a non-finite loss ({loss}); the "
                     "benchmark sizes are broken.")
  step_s, best_s = (s / steps for s in _seconds(lambda: run(steps), repeats))
  return {"step_s": step_s, "best_s": best_s, "compile_s": compile_s,
          "dot": flops["dot"], "conv": flops["conv"],
          "once": once["dot"] + once["conv"], "xla": _cost_flops(compiled)}


def coco_section(*, variants: list[str], dtypes: list[str],
                 per_device_batch: int, image_size: int, resnet_size: str,
                 vocab_size: int, steps: int, repeats: int, seed: int,
                 peaks: dict[str, float]) -> dict[tuple[str, str], float]:
  """Times the end-to-end COCO step per variant and dtype; prints its rows.

  Args:
    variants: `COCO_VARIANTS` keys.
    dtypes: `config.dtype` values.
    per_device_batch: images per device.
    image_size: `config.image_size`.
    resnet_size: `config.model.resnet_size`.
    vocab_size: V.
    steps: steps per timed repeat.
    repeats: timed repeats (median).
    seed: seeds parameters and data.
    peaks: matmul GFLOP/s of one device per dtype name.

  Returns:
    Images/s of one device per (variant, dtype).
  """
  devices = jax.local_device_count()
  sizes = dict(per_device_batch=per_device_batch, image_size=image_size,
               resnet_size=resnet_size)
  start = time.perf_counter()
  params, batch_stats = jax.block_until_ready(jax.jit(functools.partial(
      captioner.init, config=coco_config(variants[0], dtypes[0], **sizes),
      vocab_size=vocab_size))(jax.random.key(seed)))
  row("coco random init (s)", f"{time.perf_counter() - start:.1f}",
      "model.init, jitted; once for all variants")
  rates = {}
  for variant in variants:
    for dtype_name in dtypes:
      config = coco_config(variant, dtype_name, **sizes)
      timed = time_coco_step(config, params, batch_stats,
                             vocab_size=vocab_size, steps=steps,
                             repeats=repeats, seed=seed)
      name = f"coco {variant} {dtype_name}"
      step_s, best_s = timed["step_s"], timed["best_s"]
      rates[variant, dtype_name] = per_device_batch / step_s
      row(f"{name} images/s", f"{config.batch_size / step_s:.1f}",
          f"{step_s * 1e3:.0f} ms/step (best {best_s * 1e3:.0f}), median of "
          f"{repeats} x {steps}, {per_device_batch}/device x {devices}, "
          f"{config.captions_per_image} captions each, "
          f"{config.image_size} px, {captioner.num_regions(config)} regions, "
          f"compile {timed['compile_s']:.0f} s")
      flops = timed["dot"] + timed["conv"]
      row(f"{name} GFLOP/image", f"{flops / per_device_batch / 1e9:.2f}",
          f"convs {timed['conv'] / per_device_batch / 1e9:.2f} + matmuls "
          f"{timed['dot'] / per_device_batch / 1e9:.2f}; XLA cost analysis "
          f"{timed['xla'] / timed['once']:.0%} of jaxpr, loops once")
      peak = peaks[dtype_name]
      row(f"{name} utilisation", f"{flops / step_s / 1e9 / peak:.1%}",
          f"{flops / step_s / 1e9:.0f} GFLOP/s/device of the "
          f"{dtype_name} matmul peak {peak:.0f} (best repeat "
          f"{flops / best_s / 1e9 / peak:.1%})")
  return rates


# Words of the shapes set's vocabulary (`configs/shapes.py` builds 43).
SHAPES_VOCAB = 43


def shapes_section(*, dtypes: list[str], steps: int, repeats: int,
                   seed: int) -> None:
  """Times the default run's training step per `config.dtype`; prints rows.

  `step.compile_steps` of `configs/shapes.py` (the tiny ResNet at 64 px,
  trained from scratch, and its small decoder, batch 32) on random images
  and captions, as `time_coco_step` times the COCO step. The run itself
  splits the CPU into one device per core; here it is one device.

  Args:
    dtypes: `config.dtype` values.
    steps: steps per timed repeat.
    repeats: timed repeats (median).
    seed: seeds parameters and data.
  """
  times = {}
  for dtype_name in dtypes:
    config = shapes.get_config()
    config.dtype = dtype_name
    devices = jax.local_device_count()
    config.batch_size = config.batch_size // devices * devices
    params, batch_stats = jax.jit(functools.partial(
        captioner.init, config=config, vocab_size=SHAPES_VOCAB))(
            jax.random.key(seed))
    timed = time_coco_step(config, params, batch_stats,
                           vocab_size=SHAPES_VOCAB, steps=steps,
                           repeats=repeats, seed=seed)
    times[dtype_name] = timed["step_s"]
    flops = timed["dot"] + timed["conv"]
    versus = (f", {times['float32'] / timed['step_s']:.2f}x float32"
              if dtype_name != "float32" and "float32" in times else "")
    row(f"shapes {dtype_name} steps/s", f"{1 / timed['step_s']:.1f}",
        f"{timed['step_s'] * 1e3:.1f} ms/step (best "
        f"{timed['best_s'] * 1e3:.1f}){versus}, {flops / 1e9:.2f} GFLOP "
        f"(convs {timed['conv'] / flops:.0%}), compile "
        f"{timed['compile_s']:.0f} s")


def pipeline_section(*, dataset: str, data_dir: str, batches: int,
                     shuffle_buffer: int, feed_rate: float, feed_note: str
                     ) -> None:
  """Times the training input pipeline alone and prints its rows.

  `TfdsSource(config).train_dataset` of `configs/coco.py` (JPEG decode,
  resize, caption choice and tokenisation, batching), once on one tf.data
  thread and once on all cores, and the host cores that keep one
  accelerator fed. Skipped, with one line, where TensorFlow or TFDS is
  missing.

  Args:
    dataset: the TFDS set (`config.dataset`).
    data_dir: its TFDS data_dir; "" is TFDS's default.
    batches: timed batches per run.
    shuffle_buffer: `config.shuffle_buffer_size`.
    feed_rate: images/s of one accelerator; 0 leaves out the cores row.
    feed_note: where `feed_rate` comes from.
  """
  # Before TensorFlow loads: its C++ start-up lines would break the table.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    # Imported here: the rest of the benchmark runs where TensorFlow is not
    # installed (accelerator images).
    # pylint: disable=g-import-not-at-top
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from visionspeak_jax.data import input_pipeline
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    print(f"  input pipeline: skipped, {e.name} is not installed", flush=True)
    return
  tf.get_logger().setLevel("ERROR")  # AutoGraph's notes on the lambdas.
  tfds.disable_progress_bar()
  # TensorFlow would otherwise reserve the accelerators' memory.
  tf.config.set_visible_devices([], "GPU")
  config = coco.get_config("1")  # One accelerator's batch.
  config.dataset = dataset
  config.data_dir = data_dir
  config.shuffle_buffer_size = shuffle_buffer
  start = time.perf_counter()
  source = input_pipeline.TfdsSource(config)  # Generates it if needed.
  open_s = time.perf_counter() - start
  start = time.perf_counter()
  vocab = vocabulary.Vocabulary.build(source.captions(config.train_split),
                                      min_count=config.vocab_min_count)
  row("pipeline vocabulary (words)", len(vocab),
      f"{dataset} {config.train_split}, built in "
      f"{time.perf_counter() - start:.0f} s (open/prepare {open_s:.0f} s)")
  images = batches * config.batch_size
  per_cpu_second = None
  for threads in (1, None):
    ds = source.train_dataset(vocab, seed=0, process_index=0, process_count=1)
    if threads:
      options = tf.data.Options()
      options.threading.private_threadpool_size = threads
      options.threading.max_intra_op_parallelism = threads
      ds = ds.with_options(options)
    iterator = ds.as_numpy_iterator()
    # The first batch waits for the shuffle buffer; the next ones stream.
    for _ in range(3):
      next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(iterator)
    wall_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    del iterator
    name = "1 thread" if threads else f"all {os.cpu_count()} cores"
    row(f"pipeline images/s, {name}", f"{images / wall_s:.0f}",
        f"{images / cpu_s:.0f} per CPU-second of this process, {batches} "
        f"batches of {config.batch_size} at {config.image_size} px")
    # The one-thread run's CPU time also holds TFDS's file reading and the
    # Python consumer, which one core must do as well.
    per_cpu_second = per_cpu_second or images / cpu_s
  if feed_rate > 0:
    row("host cores per accelerator", f"{feed_rate / per_cpu_second:.2f}",
        f"{feed_rate:.0f} images/s ({feed_note}) / {per_cpu_second:.0f} "
        "images per CPU-second (1 thread)")


def main(argv):
  del argv
  # The table is the output: TFDS's progress lines would break it up.
  logging.set_verbosity(logging.WARNING)
  cpu_tuning.set_cpu_xla_flags()  # As a run has them (printed below).
  sizes = decoder_sizes()
  device = jax.devices()[0]
  # Wall-time numbers halve when anything else runs: say so up front.
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"jax {jax.__version__}, {device.platform}: {device.device_kind} x "
        f"{jax.device_count()} ({jax.local_device_count()} local), "
        f"{os.cpu_count()} CPUs ({cpu_tuning.cpu_model()}; "
        f"{cpu_tuning.cpu_flags_phrase()}), load average {load:.1f}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"{cpu_tuning.describe()}")
  print(f"decoder sizes: B={_BATCH.value} T={_LENGTH.value} "
        f"R={_REGIONS.value} C={_FEATURE_DIM.value} V={_VOCAB.value} "
        f"E={_EMBED.value} H={_HIDDEN.value} A={_ATTENTION.value} "
        f"gate={_GATE.value} deep={_DEEP.value} dropout={_DROPOUT.value}")
  size = (f"{_COCO_IMAGE_SIZE.value} px" if _COCO_IMAGE_SIZE.value
          else "each config's image size")
  print(f"COCO step: configs/coco*.py, ResNet-{_COCO_RESNET.value} at "
        f"{size}, {_COCO_BATCH.value} images/device, V={_VOCAB.value}\n")

  n = _PEAK_SIZE.value or (2048 if device.platform == "cpu" else 8192)
  peaks = {}
  for dtype_name in ("float32", "bfloat16"):
    peaks[dtype_name] = matmul_peak(n, dtype=captioner.DTYPES[dtype_name]
                                    or jnp.float32)
    row(f"matmul peak {dtype_name} (GFLOP/s)", f"{peaks[dtype_name]:.1f}",
        f"[{n},{n}]@[{n},{n}], float32 sums, best of 10")

  rates = {}
  if _COCO_VARIANTS.value:
    rates = coco_section(
        variants=_COCO_VARIANTS.value, dtypes=_COCO_DTYPES.value,
        per_device_batch=_COCO_BATCH.value,
        image_size=_COCO_IMAGE_SIZE.value, resnet_size=_COCO_RESNET.value,
        vocab_size=_VOCAB.value, steps=_COCO_STEPS.value,
        repeats=_COCO_REPEATS.value, seed=_SEED.value, peaks=peaks)

  if _SHAPES_DTYPES.value:
    shapes_section(dtypes=_SHAPES_DTYPES.value, steps=_SHAPES_STEPS.value,
                   repeats=_COCO_REPEATS.value, seed=_SEED.value)

  flops_items = None
  for regions in [_REGIONS.value] + [int(r) for r in _EXTRA_REGIONS.value]:
    at = dict(sizes, regions=regions)
    if regions != _REGIONS.value and (_DECODER_STEP.value
                                      or _BEAM_SIZES.value):
      side = math.isqrt(regions)
      grid = f" ({side}x{side})" if side * side == regions else ""
      print(f"decoder at R={regions}{grid}:", flush=True)
    if _DECODER_STEP.value:
      items = decoder_step_section(
          sizes=at, dropout_rate=_DROPOUT.value, alpha_c=_ALPHA_C.value,
          steps=_STEPS.value, repeats=_REPEATS.value, seed=_SEED.value,
          peak=peaks["float32"], bf16_peak=peaks["bfloat16"])
      flops_items = flops_items or items
    if _BEAM_SIZES.value:
      beam_section(
          sizes=at, beam_batch=_BEAM_BATCH.value,
          beam_sizes=[int(k) for k in _BEAM_SIZES.value],
          beam_length=_BEAM_LENGTH.value, beam_repeats=_BEAM_REPEATS.value,
          decode_dtypes=_DECODE_DTYPES.value, seed=_SEED.value)

  if _PIPELINE_DATASET.value:
    feed_rate, feed_note = _FEED_RATE.value, "--feed_rate"
    if not feed_rate and ("frozen", "bfloat16") in rates:
      feed_rate = rates["frozen", "bfloat16"]
      feed_note = "coco frozen bfloat16 above, per device"
    pipeline_section(
        dataset=_PIPELINE_DATASET.value, data_dir=_PIPELINE_DATA_DIR.value,
        batches=_PIPELINE_BATCHES.value,
        shuffle_buffer=_PIPELINE_SHUFFLE.value, feed_rate=feed_rate,
        feed_note=feed_note)

  if flops_items:
    print("\nforward matmul GFLOP of one decoder training step:")
    for name, value in flops_items.items():
      print(f"  {name:<34} {value / 1e9:8.3f}")


if __name__ == "__main__":
  app.run(main)
