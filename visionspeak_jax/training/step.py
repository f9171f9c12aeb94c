"""The training step: one optimisation step per device, and its compilation.

`train_step` is a per-device function that names its collectives over the
`batch` axis; `compile_steps` maps it (and `captioner.predict`) over the local
devices with `jax.pmap`, the state unreplicated (`in_axes=None`,
`out_axes=None`). Nothing here imports TensorFlow, so the benchmarks run
this very step on an accelerator image without it; `train.py` feeds it.
"""

import functools
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoder
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.training import hard_attention
from visionspeak_jax.training import optimizer
from visionspeak_jax.training import state as state_lib


def caption_rows(tokens: jax.Array) -> tuple[jax.Array, int]:
  """A batch's captions as decoder rows, and the rows per image.

  Args:
    tokens: int32 [b, T + 1], one caption per image, or [b, K, T + 1], K
      captions per image (`config.captions_per_image`).

  Returns:
    (tokens [b * K, T + 1], row i * K + k captioning image i; K).
  """
  if tokens.ndim == 2:
    return tokens, 1
  b, k, length = tokens.shape
  return tokens.reshape(b * k, length), k


def split_tokens(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, T + 1] padded captions -> inputs [B, T], targets [B, T], mask [B, T]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  return inputs, targets, (targets != vocab_lib.PAD_ID).astype(jnp.float32)


def gradient_update(state: state_lib.TrainState,
                    config: ml_collections.ConfigDict,
                    loss_fn: Callable[[Any, bool], tuple[jax.Array, tuple[Any, Any]]]
                    ) -> tuple[state_lib.TrainState, Any, Any]:
  """One optimizer update from a per-device loss; every objective uses it.

  Only the subtrees that `config.lr_mults` trains are differentiated and
  averaged; frozen ones enter under `stop_gradient` and get zero gradients,
  which their `optax.set_to_zero` ignores.

  Args:
    state: the train state (same on every device).
    config: the run config.
    loss_fn: `(params, train_encoder) -> (loss, (batch_stats, aux))` on this
      device's share of the batch, normalised so that the `pmean` of the
      per-device gradients is the global-batch gradient. `train_encoder`
      says whether the encoder is trained (BatchNorm in training mode).

  Returns:
    (new state, the averaged gradients, aux).
  """
  trained, frozen = optimizer.trainable(config, state.params)
  frozen = lax.stop_gradient(frozen)

  def loss_of_trained(trained):
    return loss_fn({**frozen, **trained}, "encoder" in trained)

  # Differentiate per-device copies of the parameters: the gradients stay
  # local until the one explicit pmean, instead of JAX summing them across
  # devices implicitly at every use of the parameters inside the scans.
  grads, (batch_stats, aux) = jax.grad(loss_of_trained, has_aux=True)(
      lax.pcast(trained, "batch", to="varying"))
  grads = {**jax.tree.map(jnp.zeros_like, frozen),
           **lax.pmean(grads, "batch")}
  # Synchronised BatchNorm already made the statistics equal across devices.
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), grads, aux


def is_finite(loss: jax.Array, state: state_lib.TrainState) -> jax.Array:
  """The `finite` metric: the loss and the new parameters are finite.

  Non-finite values never go away again (Adam's moments keep them), so
  checking the new state before each save keeps every checkpoint finite.
  """
  return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(state.params))


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, *, config: ml_collections.ConfigDict
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One cross-entropy step on this device's share of the global batch.

  The loss is normalised by the mean number of tokens (and captions) per
  device, so that `pmean` of the per-device gradients is exactly the gradient
  of the global-batch loss, whatever the device count (`gradient_update`).
  With hard attention (`config.model.attention`), each word reads one
  sampled region and the loss adds `hard_attention`'s terms.

  Args:
    state: the train state (same on every device).
    batch: the data source's input (`image` uint8 [b, S, S, 3] or
      `features` float16 [b, R, C]) and `tokens` int32 [b, T + 1] or
      [b, K, T + 1] (`caption_rows`).
    rng: the run's base key; the step and device are folded in here.
    config: the run config.

  Returns:
    (new state, metrics summed over devices).
  """
  encoder = captioner.create_encoder(config, axis_name="batch")
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                           lax.axis_index("batch"))
  tokens, per_image = caption_rows(batch["tokens"])
  inputs, targets, mask = split_tokens(tokens)
  hard = captioner.attention_kind(config) == "hard"
  regions = None
  if hard:  # Soft runs keep `rng` for dropout alone, as they always did.
    rng, regions_rng = jax.random.split(rng)
    regions = hard_attention.draw_regions(
        regions_rng, inputs.shape[0], inputs.shape[1],
        captioner.num_regions(config), config.hard_attention.sample_prob)

  def loss_fn(params, train_encoder):
    features, batch_stats = captioner.encode(
        encoder, params, state.batch_stats, batch, train=train_encoder,
        grid_hw=captioner.grid(config))
    if per_image > 1:
      # Each image encoded once, its features read by its K captions' rows.
      features = jnp.repeat(features, per_image, axis=0)  # [b*K, R, C]
    logits, alphas, chosen = fast_decoder.teacher_forced(
        params["decoder"], features, inputs,
        dropout_rate=config.model.dropout_rate, rng=rng,
        dtype=captioner.compute_dtype(config), regions=regions)
    terms = decoder.loss_terms(logits, targets, mask, alphas)
    tokens = jnp.maximum(lax.pmean(terms["tokens"], "batch"), 1.0)
    captions = jnp.maximum(lax.pmean(terms["captions"], "batch"), 1.0)
    loss = decoder.loss(terms, config.alpha_c, tokens, captions)
    if hard:
      hard_terms = hard_attention.loss_terms(
          logits, targets, mask, alphas, chosen, regions,
          state.attention_baseline, state.step == 0,
          decay=config.hard_attention.baseline_decay)
      loss += hard_attention.loss(hard_terms, tokens, config)
      terms = {**terms, **hard_terms}
    return loss, (batch_stats, terms)

  state, grads, terms = gradient_update(state, config, loss_fn)
  metrics = {}
  if hard:
    state = state.replace(attention_baseline=terms.pop("new_baseline"))
    # The same on every device already.
    metrics.update(reward=terms.pop("reward"), baseline=terms.pop("baseline"))
  totals = lax.psum(terms, "batch")
  tokens = jnp.maximum(totals["tokens"], 1.0)
  captions = jnp.maximum(totals["captions"], 1.0)
  metrics.update({
      "xent": totals["xent_sum"] / tokens,
      "attention_loss": totals["attention_sum"] / captions,
      "accuracy": totals["correct"] / tokens,
      "grad_norm": optax.tree.norm(grads),
  })
  metrics["loss"] = metrics["xent"] + config.alpha_c * metrics["attention_loss"]
  if hard:
    metrics["entropy"] = totals["entropy_sum"] / tokens
    metrics["loss"] += hard_attention.loss(totals, tokens, config)
  metrics["finite"] = is_finite(metrics["loss"], state)
  return state, metrics


def compile_steps(config: ml_collections.ConfigDict,
                  devices: list[jax.Device] | None = None):
  """The pmapped train step and predict function; no state is replicated.

  Args:
    config: the run config.
    devices: the local devices to map over (default: all).

  Returns:
    (p_train_step(state, batch, rng),
     p_predict(params, batch_stats, decoding weights, inputs)).
  """
  p_train_step = jax.pmap(
      functools.partial(train_step, config=config), axis_name="batch",
      in_axes=(None, 0, None), out_axes=(None, None),
      donate_argnums=(0,) if jax.process_count() == 1 else (),
      devices=devices)
  p_predict = captioner.compile_predict(config, devices)
  return p_train_step, p_predict


def place_state(state: Any, devices: list[jax.Device] | None = None) -> Any:
  """The state placed as `compile_steps`'s train step returns it.

  A new or restored state sits uncommitted on one device; the pmapped step
  returns it committed and replicated over a mesh of its devices, and pmap
  compiles again for an argument placed differently: the second step of
  every run compiled the step a second time.
  With several processes the step's mesh spans them all and the state is
  left as it is (one more compile there).

  Args:
    state: the train state (or any pytree of arrays) for the step's
      unmapped first argument.
    devices: the devices given to `compile_steps` (default: all local).

  Returns:
    `state` on those devices, replicated.
  """
  if jax.process_count() > 1:
    return state
  mesh = jax.sharding.Mesh(np.array(devices or jax.local_devices()),
                           ("batch",))
  return jax.device_put(
      state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
