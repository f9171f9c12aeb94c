"""Additive (Bahdanau) attention as pure functions over a parameter pytree.

  e_r     = v . tanh(W_f f_r + b_f + W_h h)       (one score per region r)
  alpha   = softmax_r(e)
  context = sum_r alpha_r f_r

`W_f f + b_f` does not depend on the decoder state, so it is computed once per
image with `project_features` and reused at every time step.
"""

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def init(key: jax.Array, feature_dim: int, hidden_dim: int,
         attention_dim: int) -> Params:
  """Creates attention parameters.

  Args:
    key: PRNG key.
    feature_dim: C, channels of a region feature.
    hidden_dim: H, size of the decoder state that queries the regions.
    attention_dim: A, size of the joint attention space.

  Returns:
    A dict with `w_f` [C, A], `b_f` [A], `w_h` [H, A] and `v` [A].
  """
  k_f, k_h, k_v = jax.random.split(key, 3)
  glorot = jax.nn.initializers.glorot_uniform()
  return {
      "w_f": glorot(k_f, (feature_dim, attention_dim)),
      "b_f": jnp.zeros((attention_dim,)),
      "w_h": glorot(k_h, (hidden_dim, attention_dim)),
      "v": glorot(k_v, (attention_dim, 1))[:, 0],
  }


def project_features(params: Params, features: jax.Array) -> jax.Array:
  """Projects region features into the attention space, once per image.

  Args:
    params: attention parameters.
    features: [B, R, C] region features.

  Returns:
    [B, R, A] projected features.
  """
  return features @ params["w_f"] + params["b_f"]  # [B, R, C] -> [B, R, A]


def attend(params: Params, features: jax.Array, features_proj: jax.Array,
           h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scores every region against the decoder state and mixes the features.

  Args:
    params: attention parameters.
    features: [B, R, C] region features.
    features_proj: [B, R, A], `project_features(params, features)`.
    h: [B, H] decoder hidden state.

  Returns:
    (context [B, C], alpha [B, R]); alpha sums to 1 over regions.
  """
  return attend_query(params, features, features_proj,
                      h @ params["w_h"])  # [B, H] -> [B, A]


def attend_query(params: Params, features: jax.Array,
                 features_proj: jax.Array,
                 query: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`attend` from an already projected query `h @ w_h`.

  Lets a caller fuse the query projection with other matmuls on `h`.

  Args:
    params: attention parameters.
    features: [B, R, C] region features.
    features_proj: [B, R, A], `project_features(params, features)`.
    query: [B, A], `h @ params["w_h"]`.

  Returns:
    (context [B, C], alpha [B, R]); alpha sums to 1 over regions.
  """
  scores = jnp.tanh(features_proj + query[:, None, :]) @ params["v"]  # [B, R]
  alpha = jax.nn.softmax(scores, axis=-1)
  context = jnp.einsum("br,brc->bc", alpha, features)  # [B, R, C] -> [B, C]
  return context, alpha
