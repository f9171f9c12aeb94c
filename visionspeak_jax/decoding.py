"""Model-agnostic decoding over a step function.

A step function has the signature

  step_fn(tokens [B], state) -> (logits [B, V], state, alpha [B, R])

where `state` is any pytree carried between steps and `alpha` is the
attention map that produced the word (any fixed trailing shape works).
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any, jax.Array]]


@flax.struct.dataclass
class Decoded:
  """What a decoder returns for a batch."""
  tokens: jax.Array  # [B, L] int, PAD after EOS
  scores: jax.Array  # [B] sum of log-probabilities of the chosen words
  lengths: jax.Array  # [B] words before EOS
  alphas: jax.Array  # [B, L, R] attention map of every chosen word


def greedy(step_fn: StepFn, state: Any, batch_size: int, max_length: int, *,
           bos_id: int, eos_id: int, pad_id: int = 0) -> Decoded:
  """Picks the most likely word at every step, for `max_length` steps.

  Args:
    step_fn: the step function.
    state: initial decoder state.
    batch_size: B.
    max_length: L, number of generated tokens (EOS included).
    bos_id: first input token.
    eos_id: end token; later positions become `pad_id`.
    pad_id: filler after EOS.

  Returns:
    A `Decoded`.
  """

  def body(carry, _):
    tokens, state, done, score = carry
    logits, state, alpha = step_fn(tokens, state)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))  # [B, V]
    best = logprobs.argmax(-1)  # [B]
    score = score + jnp.where(done, 0.0,
                              jnp.take_along_axis(logprobs, best[:, None],
                                                  -1)[:, 0])
    best = jnp.where(done, pad_id, best)
    emitted = ~done
    done = done | (best == eos_id)
    return (best, state, done, score), (best, alpha, emitted & (best != eos_id))

  init = (jnp.full((batch_size,), bos_id, jnp.int32), state,
          jnp.zeros((batch_size,), bool), jnp.zeros((batch_size,)))
  (_, _, _, score), (tokens, alphas, is_word) = jax.lax.scan(
      body, init, None, length=max_length)
  # Time-major back to batch-major: [L, B, ...] -> [B, L, ...].
  return Decoded(tokens=tokens.T.astype(jnp.int32), scores=score,
                 lengths=is_word.sum(0).astype(jnp.int32),
                 alphas=alphas.swapaxes(0, 1))
