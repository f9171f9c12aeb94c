"""The train state: parameters, BatchNorm statistics, optimizer state, step."""

from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections

from visionspeak_jax.models import captioner
from visionspeak_jax.platform import cpu_tuning
from visionspeak_jax.training import optimizer


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Hard attention's REINFORCE baseline (a float32 scalar, see
  # hard_attention.py); None, so absent from checkpoints, for soft runs.
  attention_baseline: Any = None


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       vocab_size: int, *, encoder: bool = True
                       ) -> TrainState:
  """Fresh random parameters, BatchNorm statistics and optimizer state.

  Args:
    rng: PRNG key of the parameters.
    config: the run config.
    vocab_size: V.
    encoder: include the ResNet; False when the data source gives features
      (`params` is then `{"decoder": ...}` and `batch_stats` empty).

  Returns:
    The state at step 0.
  """
  init = jax.jit(lambda key: captioner.init(key, config, vocab_size,
                                            encoder=encoder))
  params, batch_stats = init.lower(rng).compile(
      cpu_tuning.init_compiler_options())(rng)
  state = TrainState.create(
      apply_fn=None, params=params, tx=optimizer.create(config, list(params)),
      batch_stats=batch_stats,
      attention_baseline=(
          jnp.zeros((), jnp.float32)
          if captioner.attention_kind(config) == "hard" else None))
  # An array step from the start: a Python int here would make the second
  # call of the compiled step see a new signature and compile again.
  return state.replace(step=jnp.zeros((), jnp.int32))
