"""An LSTM cell as a pure function, with one fused gate matmul.

Gates are laid out as [input, forget, cell, output] along the last axis of
the fused weight, so `[x; h] @ w` yields all four pre-activations at once.
"""

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
Carry = tuple[jax.Array, jax.Array]  # (h [B, H], c [B, H])


def init(key: jax.Array, input_dim: int, hidden_dim: int,
         forget_bias: float = 1.0) -> Params:
  """Creates LSTM parameters.

  Args:
    key: PRNG key.
    input_dim: I, size of the input at each step.
    hidden_dim: H, size of h and c.
    forget_bias: added to the forget gate bias so early training remembers.

  Returns:
    A dict with `w` [I + H, 4H] and `b` [4H].
  """
  k_x, k_h = jax.random.split(key)
  w_x = jax.nn.initializers.glorot_uniform()(k_x, (input_dim, 4 * hidden_dim))
  # Orthogonal recurrent weights keep the early gradients well conditioned.
  w_h = jnp.concatenate(
      [jax.nn.initializers.orthogonal()(k, (hidden_dim, hidden_dim))
       for k in jax.random.split(k_h, 4)], axis=1)
  b = jnp.zeros((4 * hidden_dim,)).at[hidden_dim:2 * hidden_dim].set(
      forget_bias)
  return {"w": jnp.concatenate([w_x, w_h], axis=0), "b": b}


def cell(params: Params, carry: Carry, x: jax.Array) -> Carry:
  """One LSTM step.

  Args:
    params: LSTM parameters.
    carry: (h, c), each [B, H].
    x: [B, I] input.

  Returns:
    The new (h, c).
  """
  h, c = carry
  z = jnp.concatenate([x, h], axis=-1) @ params["w"] + params["b"]  # [B, 4H]
  return apply_gates(z, c)


def apply_gates(z: jax.Array, c: jax.Array) -> Carry:
  """The LSTM update from gate pre-activations.

  `cell` computes `z` with one matmul; a caller that knows part of the input
  ahead of time (teacher forcing) can compute `z` in pieces and finish here.

  Args:
    z: [B, 4H] pre-activations `[x; h] @ w + b`, gates [i, f, g, o].
    c: [B, H] previous cell state.

  Returns:
    The new (h, c).
  """
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return h, c


def unroll(params: Params, carry: Carry,
           xs: jax.Array) -> tuple[Carry, jax.Array]:
  """Runs the cell over a time-major sequence with `lax.scan`.

  Args:
    params: LSTM parameters.
    carry: initial (h, c), each [B, H].
    xs: [T, B, I] inputs.

  Returns:
    (final carry, hs [T, B, H]).
  """

  def body(carry, x):
    carry = cell(params, carry, x)
    return carry, carry[0]

  return jax.lax.scan(body, carry, xs)
