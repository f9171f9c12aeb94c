"""Additive (Bahdanau) attention as pure functions over a parameter pytree.

  e_r     = v . tanh(W_f f_r + b_f + W_h h)       (one score per region r)
  alpha   = softmax_r(e)
  context = sum_r alpha_r f_r

`W_f f + b_f` does not depend on the decoder state, so it is computed once per
image with `project_features` and reused at every time step.

That is the paper's soft ("deterministic") attention. Its stochastic hard
attention (section 4.1) reads one region instead: s ~ Multinoulli(alpha),
context = f_s. `attend_query` takes the choice as `Regions`: a sample drawn
with the Gumbel-max trick (noise drawn outside, so a step stays a pure
function of its inputs), and the most likely region (noise of zeros), which
is how hard attention decodes.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from visionspeak_jax.models import precision

Params = dict[str, Any]
KINDS = ("soft", "hard")


class Regions(NamedTuple):
  """How hard attention picks the region it reads, per row of the batch.

  Row b reads region argmax_r(scores[b, r] + gumbel[b, r]) when hard[b] is
  1, which is a sample of Multinoulli(alpha[b]) for standard Gumbel noise
  and the most likely region for zeros; a row with hard[b] = 0 reads the
  soft context (the paper mixes the two in training).
  """
  gumbel: jax.Array  # [B, R] noise added to the scores
  hard: jax.Array  # [B] 1.0: read the chosen region; 0.0: the soft context


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
    params: attention parameters; `w_f` may be a lower-precision copy, and
      the product still accumulates in float32.
    features: [B, R, C] region features.

  Returns:
    [B, R, A] projected features, float32.
  """
  # A bfloat16 copy of `w_f` runs a bfloat16 matmul.
  return precision.matmul(features, params["w_f"]) + params["b_f"]


def attend(params: Params, features: jax.Array, features_proj: jax.Array,
           h: jax.Array, regions: Regions | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """Scores every region against the decoder state and mixes the features.

  Args:
    params: attention parameters.
    features: [B, R, C] region features.
    features_proj: [B, R, A], `project_features(params, features)`.
    h: [B, H] decoder hidden state.
    regions: None for soft attention; hard attention's `Regions`.

  Returns:
    (context [B, C], alpha [B, R]); alpha sums to 1 over regions.
  """
  context, alpha, _ = attend_query(params, features, features_proj,
                                   h @ params["w_h"],  # [B, H] -> [B, A]
                                   regions)
  return context, alpha


def attend_query(params: Params, features: jax.Array,
                 features_proj: jax.Array, query: jax.Array,
                 regions: Regions | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`attend` from an already projected query `h @ w_h`.

  Lets a caller fuse the query projection with other matmuls on `h`. The
  query may hold K rows per image (K = rows / B, the hypotheses of a beam
  search, row b * K + k belonging to image b): they all read the one copy
  of the image's features, so nothing is repeated per hypothesis.

  Args:
    params: attention parameters.
    features: [B, R, C] region features.
    features_proj: [B, R, A], `project_features(params, features)`.
    query: [B*K, A], `h @ params["w_h"]`.
    regions: None for soft attention; hard attention's `Regions` ([B*K]
      rows).

  Returns:
    (context [B*K, C], alpha [B*K, R], region [B*K] int32 or None): alpha
    sums to 1 over regions; with `regions`, the region each row chose
    (read only where `hard` is 1).
  """
  b, r, c = features.shape
  k = query.shape[0] // b
  if k == 1:  # Training, greedy: the plain form, which XLA fuses best.
    scores = jnp.tanh(features_proj + query[:, None, :]) @ params["v"]
    alpha = jax.nn.softmax(scores, axis=-1)  # [B, R]
    weights, region = _read_weights(alpha, scores, regions)
    return jnp.einsum("br,brc->bc", weights, features), alpha, region
  query = query.reshape(b, k, -1)  # [B*K, A] -> [B, K, A]
  # [B, 1, R, A] + [B, K, 1, A] -> [B, K, R, A] -> [B, K, R]
  scores = jnp.tanh(features_proj[:, None] + query[:, :, None]) @ params["v"]
  alpha = jax.nn.softmax(scores, axis=-1)
  weights, region = _read_weights(
      alpha, scores, None if regions is None else jax.tree.map(
          lambda x: x.reshape((b, k) + x.shape[1:]), regions))
  context = jnp.einsum("bkr,brc->bkc", weights, features)  # [B, K, C]
  return (context.reshape(-1, c), alpha.reshape(-1, r),
          None if region is None else region.reshape(-1))


def _read_weights(alpha: jax.Array, scores: jax.Array,
                  regions: Regions | None
                  ) -> tuple[jax.Array, jax.Array | None]:
  """The weights [..., R] that mix the features, and the chosen regions.

  The one-hot of a chosen region carries no gradient to alpha: hard
  attention learns where to look from its REINFORCE term instead.
  """
  if regions is None:
    return alpha, None
  region = jnp.argmax(scores + regions.gumbel, axis=-1)  # [...]
  return (mix_weights(alpha, region, regions.hard[..., None]),
          region.astype(jnp.int32))


def mix_weights(alpha: jax.Array, region: jax.Array, hard: jax.Array
                ) -> jax.Array:
  """Hard attention's weights [..., R]: the region's one-hot where `hard`
  is 1, alpha where it is 0 (`hard` broadcasts against [..., R])."""
  one_hot = jax.nn.one_hot(region, alpha.shape[-1], dtype=alpha.dtype)
  return hard * one_hot + (1.0 - hard) * alpha
