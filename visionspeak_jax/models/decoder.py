"""The "Show, Attend and Tell" decoder as pure functions.

One step, given the previous word and the state (h, c):

  alpha, context = attend(features, h)
  context       *= sigmoid(W_beta h + b_beta)      (scalar or vector gate)
  h, c           = lstm([embed(prev word); context], (h, c))
  logits         = W_o dropout(h) + b_o                          (plain), or
  logits         = L_o dropout(embed(prev) + L_h h + L_z context)  (deep output)

This module is the reference: `init`, `step` as written above, and the
loss. `fast_decoder` rearranges the same computation for speed (fused
weights, a hand-written backward pass, decoding tables), and the tests hold
it equal to `step`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from visionspeak_jax.models import attention
from visionspeak_jax.models import lstm
from visionspeak_jax.models import precision

Params = dict[str, Any]
GATES = ("vector", "scalar", "none")


def _dense(key: jax.Array, n_in: int, n_out: int) -> Params:
  return {"w": jax.nn.initializers.glorot_uniform()(key, (n_in, n_out)),
          "b": jnp.zeros((n_out,))}


# Leaf names of the decoder's matmul weights (attention `w_f`, `w_h`; every
# dense `w`). `v`, biases, embeddings and positions are not matmul inputs
# worth casting: they enter sums, lookups and a [A] dot product.
MATMUL_WEIGHTS = ("w", "w_f", "w_h")


def cast_matmul_weights(params: Params, dtype: Any) -> Params:
  """The decoder parameters with every matmul weight cast to `dtype`.

  Mixed-precision training runs the decoder on this copy:
  `precision.matmul` casts each input to its weight's dtype and accumulates
  in float32, so logits, softmax and loss stay float32, and the gradients
  flow back through the cast to the float32 parameters. None or float32
  returns `params`.
  """
  if dtype is None or dtype == jnp.float32:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if path[-1].key in MATMUL_WEIGHTS
      else x, params)


def _apply_dense(p: Params, x: jax.Array) -> jax.Array:
  return precision.matmul(x, p["w"]) + p["b"]


def init(key: jax.Array, *, vocab_size: int, feature_dim: int, embed_dim: int,
         hidden_dim: int, attention_dim: int, gate: str = "vector",
         deep_output: bool = True, num_regions: int = 0) -> Params:
  """Creates decoder parameters.

  The gate kind and the output kind are read back from the parameter
  structure, so the step functions need no extra static options.

  Args:
    key: PRNG key.
    vocab_size: V.
    feature_dim: C, channels of a region feature.
    embed_dim: E, word embedding size.
    hidden_dim: H, LSTM size.
    attention_dim: A, attention space size.
    gate: "vector" (one gate per channel), "scalar" (one per step) or "none".
    deep_output: use the paper's deep output layer instead of a plain one.
    num_regions: R > 0 adds a learned position embedding [R, C] to the
      region features, so attention and the LSTM know where a region is (a
      small CNN's features barely encode it, and "left of" needs it); 0
      leaves the features as the encoder gives them, as in the paper.

  Returns:
    The decoder parameter pytree.
  """
  if gate not in GATES:
    raise ValueError(f"decoder gate must be one of {GATES}, got {gate!r}.")
  keys = jax.random.split(key, 9)
  params = {
      "embed": jax.random.uniform(keys[0], (vocab_size, embed_dim),
                                  minval=-0.1, maxval=0.1),
      "init_h": _dense(keys[1], feature_dim, hidden_dim),
      "init_c": _dense(keys[2], feature_dim, hidden_dim),
      "attention": attention.init(keys[3], feature_dim, hidden_dim,
                                  attention_dim),
      "lstm": lstm.init(keys[4], embed_dim + feature_dim, hidden_dim),
  }
  if gate != "none":
    params["gate"] = _dense(keys[5], hidden_dim,
                            feature_dim if gate == "vector" else 1)
  if num_regions:
    params["positions"] = 0.1 * jax.random.normal(
        jax.random.fold_in(key, 9), (num_regions, feature_dim))
  if deep_output:
    params["deep"] = {"l_h": _dense(keys[6], hidden_dim, embed_dim),
                      "l_z": _dense(keys[7], feature_dim, embed_dim),
                      "l_o": _dense(keys[8], embed_dim, vocab_size)}
  else:
    params["out"] = _dense(keys[6], hidden_dim, vocab_size)
  return params


def add_positions(params: Params, features: jax.Array) -> jax.Array:
  """[B, R, C] features plus the position embedding, when there is one.

  Every path into the decoder (teacher forcing, decoding) starts here.
  """
  if "positions" not in params:
    return features
  if features.shape[1] != params["positions"].shape[0]:
    raise ValueError(f"The decoder was built for {params['positions'].shape[0]}"
                     f" regions but got {features.shape[1]}: use the image "
                     "size it was trained with.")
  return features + params["positions"]


def init_state(params: Params, features: jax.Array) -> lstm.Carry:
  """h0, c0 from the mean of the region features.

  Args:
    params: decoder parameters.
    features: [B, R, C].

  Returns:
    (h0, c0), each [B, H].
  """
  mean = features.mean(axis=1)  # [B, R, C] -> [B, C]
  return (jnp.tanh(_apply_dense(params["init_h"], mean)),
          jnp.tanh(_apply_dense(params["init_c"], mean)))


def project_features(params: Params, features: jax.Array) -> jax.Array:
  """[B, R, C] -> [B, R, A]; call once per image, outside the time loop."""
  return attention.project_features(params["attention"], features)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity without `rng` or at rate 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def step(params: Params, features: jax.Array, features_proj: jax.Array,
         carry: lstm.Carry, prev_tokens: jax.Array, *,
         dropout_rate: float = 0.0, rng: jax.Array | None = None,
         regions: attention.Regions | None = None
         ) -> tuple[jax.Array, lstm.Carry, jax.Array]:
  """One decoder step.

  Args:
    params: decoder parameters.
    features: [B, R, C] region features.
    features_proj: [B, R, A] projected features.
    carry: (h, c), each [B, H].
    prev_tokens: [B] int previous words.
    dropout_rate: dropout on the output layer input; used only with `rng`.
    rng: dropout key, or None for deterministic steps.
    regions: None for soft attention; for hard attention, how each row
      picks the one region it reads (`attention.Regions`).

  Returns:
    (logits [B, V], new carry, alpha [B, R]).
  """
  h, _ = carry
  emb = params["embed"][prev_tokens]  # [B] -> [B, E]
  context, alpha = attention.attend(params["attention"], features,
                                    features_proj, h, regions)
  if "gate" in params:
    # [B, H] -> [B, C] (vector) or [B, 1] (scalar)
    context = context * jax.nn.sigmoid(_apply_dense(params["gate"], h))
  carry = lstm.cell(params["lstm"], carry,
                    jnp.concatenate([emb, context], axis=-1))
  h = dropout(carry[0], dropout_rate, rng)
  return output_logits(params, emb, h, context), carry, alpha


def output_logits(params: Params, emb: jax.Array, h: jax.Array,
            context: jax.Array) -> jax.Array:
  """Logits [..., V] from the word [..., E], new h [..., H], context [..., C].

  `params` holds the decoder's `deep` or `out` subtree (the decoding
  weights of `fast_decoder` hold a cast copy of it).
  """
  if "deep" in params:
    deep = params["deep"]
    out = (emb + _apply_dense(deep["l_h"], h)
           + _apply_dense(deep["l_z"], context))  # [..., E]
    return _apply_dense(deep["l_o"], out)  # [..., E] -> [..., V]
  return _apply_dense(params["out"], h)  # [..., H] -> [..., V]


def loss_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array,
               alphas: jax.Array) -> dict[str, jax.Array]:
  """Sums that make up the SAT loss, to be normalised by the caller.

  Returning sums (not means) lets the training step normalise by the global
  token and caption counts across devices, so N devices give the same loss
  as one.

  Args:
    logits: [B, T, V].
    targets: [B, T] next words.
    mask: [B, T] 1.0 on real tokens (EOS included), 0.0 on padding.
    alphas: [B, T, R] attention weights.

  Returns:
    dict with `xent_sum` (masked cross-entropy summed over tokens),
    `attention_sum` (sum over captions of sum_r (1 - sum_t alpha_tr)^2),
    `tokens` (number of real tokens), `correct` (argmax hits on real tokens)
    and `captions` (number of captions with at least one token).
  """
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  attention_mass = (alphas * mask[..., None]).sum(axis=1)  # [B, R]
  has_tokens = (mask.sum(axis=1) > 0).astype(jnp.float32)  # [B]
  return {
      "xent_sum": (xent * mask).sum(),
      "attention_sum": (((1.0 - attention_mass) ** 2).sum(axis=-1)
                        * has_tokens).sum(),
      "tokens": mask.sum(),
      "correct": ((logits.argmax(-1) == targets) * mask).sum(),
      "captions": has_tokens.sum(),
  }


def loss(terms: dict[str, jax.Array], alpha_c: float, tokens: jax.Array,
         captions: jax.Array) -> jax.Array:
  """The SAT loss from `loss_terms`' sums.

  Args:
    terms: `loss_terms`' output.
    alpha_c: weight of the doubly stochastic attention penalty.
    tokens: the token count to divide the cross-entropy by (the global
      count in a data-parallel step).
    captions: the caption count to divide the penalty by, likewise.

  Returns:
    Cross-entropy per token + alpha_c * attention penalty per caption.
  """
  return (terms["xent_sum"] / jnp.maximum(tokens, 1.0)
          + alpha_c * terms["attention_sum"] / jnp.maximum(captions, 1.0))
