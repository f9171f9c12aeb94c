"""Optimizer rules: AdamW on one schedule, scaled per parameter subtree.

`config.lr_mults` gives each top-level parameter subtree ("encoder",
"decoder") a multiplier of the run's learning-rate schedule, as big_vision's
`lr_mults` do. A multiplier of 0 freezes the subtree: it keeps no optimizer
state, receives no gradient, and the training step runs it in inference mode
(see `trainable`). A subtree that `lr_mults` does not name gets 1.

  config.lr_mults.encoder = 0.0    # a frozen encoder, the decoder trained
  config.lr_mults.encoder = 0.025  # fine-tuning: 1e-5 on a 4e-4 schedule
"""

from typing import Any

import jax
import ml_collections
import optax

from visionspeak_jax import errors

_FROZEN = "frozen"


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           multiplier: float = 1.0) -> optax.Schedule:
  """Linear warm-up to `learning_rate` * `multiplier`, cosine decay to 0."""
  warmup = min(config.warmup_steps, config.num_train_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate * multiplier,
      warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)


def multiplier(config: ml_collections.ConfigDict, subtree: str) -> float:
  """The learning-rate multiplier of a top-level parameter subtree.

  Raises:
    errors.ConfigError: the multiplier is not a number >= 0.
  """
  value = config.lr_mults.get(subtree, 1.0)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      not value >= 0):
    raise errors.ConfigError(
        f"config.lr_mults.{subtree} must be >= 0 (0 freezes the {subtree}), "
        f"got {value!r}: fix --config.lr_mults.{subtree}.")
  return float(value)


def trainable(config: ml_collections.ConfigDict, params: dict[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits top-level parameter subtrees into (trained, frozen) dicts."""
  trained = {k: v for k, v in params.items() if multiplier(config, k) > 0}
  return trained, {k: v for k, v in params.items() if k not in trained}


def create(config: ml_collections.ConfigDict, subtrees: list[str]
           ) -> optax.GradientTransformation:
  """Clipping, then AdamW per subtree on its scaled schedule.

  Args:
    config: the run config (`learning_rate`, `warmup_steps`,
      `num_train_steps`, `weight_decay`, `grad_clip_value`,
      `grad_clip_norm`, `lr_mults`).
    subtrees: the top-level keys of the parameters.

  Returns:
    The optax transformation; frozen subtrees get `optax.set_to_zero`.
  """
  transforms = {_FROZEN: optax.set_to_zero()}
  labels = {}
  for name in subtrees:
    mult = multiplier(config, name)
    labels[name] = name if mult > 0 else _FROZEN
    if mult > 0:
      transforms[name] = optax.adamw(learning_rate_schedule(config, mult),
                                     weight_decay=config.weight_decay)
  tx = optax.multi_transform(
      transforms, lambda params: {k: jax.tree.map(lambda _, k=k: labels[k], v)
                                  for k, v in params.items()})
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.grad_clip_value > 0:
    # Each element clamped to +-value before anything else, as sgrvinod's
    # `utils.clip_gradient` (and ruotianluo's clip_grad_value_) do.
    tx = optax.chain(optax.clip(config.grad_clip_value), tx)
  return tx
