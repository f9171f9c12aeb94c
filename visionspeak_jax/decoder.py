"""The "Show, Attend and Tell" decoder as pure functions.

One step, given the previous word and the state (h, c):

  alpha, context = attend(features, h)
  context       *= sigmoid(W_beta h + b_beta)      (scalar or vector gate)
  h, c           = lstm([embed(prev word); context], (h, c))
  logits         = W_o dropout(h) + b_o                          (plain), or
  logits         = L_o dropout(embed(prev) + L_h h + L_z context)  (deep output)

`step` is that step as written. Two rearrangements compute the same thing
faster, and the tests hold both equal to it: `teacher_forced` (training,
`lax.scan` over time) and `decode_step` (every decoding strategy in
`decoding.py`, optionally with bfloat16 matmuls).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from visionspeak_jax import attention
from visionspeak_jax import lstm

Params = dict[str, Any]
GATES = ("vector", "scalar", "none")


def _dense(key: jax.Array, n_in: int, n_out: int) -> Params:
  return {"w": jax.nn.initializers.glorot_uniform()(key, (n_in, n_out)),
          "b": jnp.zeros((n_out,))}


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w with x cast to w's dtype, accumulated and returned in float32."""
  return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _apply_dense(p: Params, x: jax.Array) -> jax.Array:
  return _mm(x, p["w"]) + p["b"]


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


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def step(params: Params, features: jax.Array, features_proj: jax.Array,
         carry: lstm.Carry, prev_tokens: jax.Array, *,
         dropout_rate: float = 0.0, rng: jax.Array | None = None
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

  Returns:
    (logits [B, V], new carry, alpha [B, R]).
  """
  h, _ = carry
  emb = params["embed"][prev_tokens]  # [B] -> [B, E]
  context, alpha = attention.attend(params["attention"], features,
                                    features_proj, h)
  if "gate" in params:
    # [B, H] -> [B, C] (vector) or [B, 1] (scalar)
    context = context * jax.nn.sigmoid(_apply_dense(params["gate"], h))
  carry = lstm.cell(params["lstm"], carry,
                    jnp.concatenate([emb, context], axis=-1))
  h = _dropout(carry[0], dropout_rate, rng)
  return _output(params, emb, h, context), carry, alpha


def _output(params: Params, emb: jax.Array, h: jax.Array,
            context: jax.Array) -> jax.Array:
  """Logits [..., V] from the word [..., E], new h [..., H], context [..., C].

  `params` is the decoder's or `decoding_weights`' (same output entries).
  """
  if "deep" in params:
    deep = params["deep"]
    out = (emb + _apply_dense(deep["l_h"], h)
           + _apply_dense(deep["l_z"], context))  # [..., E]
    return _apply_dense(deep["l_o"], out)  # [..., E] -> [..., V]
  return _apply_dense(params["out"], h)  # [..., H] -> [..., V]


def fused_weights(params: Params) -> Params:
  """The decoder's recurrent weights regrouped by the input they multiply.

  Every matmul on the previous h (attention query, gate, LSTM recurrence)
  becomes one, `[H, A (+ C | 1) + 4H]`; the LSTM weight's embedding and
  context rows stand apart. `teacher_forced` and `decoding_weights` start
  from this; build it once, outside any loop.

  Args:
    params: decoder parameters.

  Returns:
    dict with `w_emb` [E, 4H], `w_ctx` [C, 4H], `w_h`, `lstm_b` and
    `small` (attention `v` and, with a gate, `gate_b`).
  """
  embed_dim = params["embed"].shape[1]
  w_lstm = params["lstm"]["w"]  # [E + C + H, 4H], rows [embedding; context; h]
  feature_dim = w_lstm.shape[0] - embed_dim - w_lstm.shape[1] // 4
  w_h = [params["attention"]["w_h"], w_lstm[embed_dim + feature_dim:]]
  small = {"v": params["attention"]["v"]}
  if "gate" in params:
    w_h.insert(1, params["gate"]["w"])
    small["gate_b"] = params["gate"]["b"]
  return {"w_emb": w_lstm[:embed_dim],
          "w_ctx": w_lstm[embed_dim:embed_dim + feature_dim],
          "w_h": jnp.concatenate(w_h, axis=1),
          "lstm_b": params["lstm"]["b"],
          "small": small}


def decoding_weights(params: Params, matmul_dtype: Any = None) -> Params:
  """Everything `decode_step` and its set-up read, prepared for decoding.

  On top of `fused_weights`, the embedding half of the LSTM input becomes a
  table, `word_gates` [V, 4H] = embed @ W_emb + b: one [V, E] @ [E, 4H]
  matmul here instead of one [N, E] @ [E, 4H] at every step. Build this
  once per checkpoint (the caption CLI, an evaluation pass) and reuse it for
  every batch.

  Args:
    params: decoder parameters.
    matmul_dtype: None keeps float32; a lower precision (bfloat16) casts
      every matmul weight, and the inputs are cast to match. The products
      still accumulate in float32, and biases, the tables and all
      elementwise work stay float32.

  Returns:
    A decoder-like pytree: `add_positions`, `init_state` and
    `project_features` accept it, and `decode_step` runs on it.
  """
  fused = fused_weights(params)
  dtype = jnp.float32 if matmul_dtype is None else matmul_dtype
  weights = {
      "embed": params["embed"],
      # [V, E] @ [E, 4H] -> [V, 4H], in the matmul precision.
      "word_gates": _mm(params["embed"], fused["w_emb"].astype(dtype))
                    + fused["lstm_b"],
      "w_ctx": fused["w_ctx"].astype(dtype),
      "w_h": fused["w_h"].astype(dtype),
      "small": fused["small"],
      "init_h": params["init_h"],
      "init_c": params["init_c"],
      "attention": {"w_f": params["attention"]["w_f"].astype(dtype),
                    "b_f": params["attention"]["b_f"]},
  }
  if "positions" in params:
    weights["positions"] = params["positions"]
  for name in ("deep", "out"):  # The output layer, its "w"s cast.
    if name in params:
      weights[name] = jax.tree_util.tree_map_with_path(
          lambda path, x: x.astype(dtype)
          if path[-1] == jax.tree_util.DictKey("w") else x, params[name])
  return weights


def _fused_dims(small: Params) -> tuple[int, int]:
  """(A, gate columns: C, 1 or 0) of the fused `w_h`, from `small`."""
  return (small["v"].shape[0],
          small["gate_b"].shape[0] if "gate_b" in small else 0)


def decode_step(weights: Params, features: jax.Array,
                features_proj: jax.Array, carry: lstm.Carry,
                prev_tokens: jax.Array
                ) -> tuple[jax.Array, lstm.Carry, jax.Array]:
  """`step` for decoding, from `decoding_weights`: same result, less work.

  Four matmuls on the state instead of seven, a table lookup for the word,
  and the K hypotheses of an image (a beam) share one copy of its
  features. No dropout.

  Args:
    weights: `decoding_weights(params, matmul_dtype)`.
    features: [B, R, C] region features (positions added). They stay
      float32 whatever the matmul dtype: their weighted sum is a
      memory-bound mix, not a matmul worth casting for.
    features_proj: [B, R, A] projected features.
    carry: (h, c), each [B*K, H]; row b * K + k belongs to image b.
    prev_tokens: [B*K] int previous words.

  Returns:
    (logits [B*K, V], new carry, alpha [B*K, R]), float32.
  """
  h, c = carry
  attention_dim, gate_dim = _fused_dims(weights["small"])
  h_proj = _mm(h, weights["w_h"])  # [B*K, H] -> [B*K, A (+ C | 1) + 4H]
  context, alpha = _attend_and_gate(attention_dim, gate_dim, weights["small"],
                                    features, features_proj, h_proj)
  carry = _cell_update(attention_dim, gate_dim, h_proj,
                       weights["word_gates"][prev_tokens],  # [B*K, 4H]
                       _mm(context, weights["w_ctx"]), c)
  emb = weights["embed"][prev_tokens]  # [B*K] -> [B*K, E]
  return _output(weights, emb, carry[0], context), carry, alpha


def _attend_and_gate(attention_dim: int, gate_dim: int, small: Params,
                     features: jax.Array, features_proj: jax.Array,
                     h_proj: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gated context [B, C] and alpha [B, R] from the fused `h @ w_h` rows."""
  context, alpha = attention.attend_query(
      {"v": small["v"]}, features, features_proj, h_proj[:, :attention_dim])
  if gate_dim:
    gate = h_proj[:, attention_dim:attention_dim + gate_dim]
    context = context * jax.nn.sigmoid(gate + small["gate_b"])
  return context, alpha


def _cell_update(attention_dim: int, gate_dim: int, h_proj: jax.Array,
                 z_emb_t: jax.Array, z_ctx: jax.Array,
                 c: jax.Array) -> lstm.Carry:
  """LSTM update from the three parts of its pre-activation."""
  z = z_emb_t + z_ctx + h_proj[:, attention_dim + gate_dim:]  # [B, 4H]
  return lstm.apply_gates(z, c)


def _recurrence_fwd(attention_dim, gate_dim, w_h, w_ctx, small, features,
                    features_proj, z_emb, carry):
  """The scan of `_recurrence`, also returning what its backward pass needs.

  The step inputs (h, c) and the two per-step matmul results are kept, so
  the backward pass recomputes only elementwise work.
  """

  def body(carry, z_emb_t):
    h, c = carry
    h_proj = h @ w_h  # [B, H] -> [B, A (+ C | 1) + 4H]
    context, alpha = _attend_and_gate(attention_dim, gate_dim, small,
                                      features, features_proj, h_proj)
    z_ctx = context @ w_ctx  # [B, C] -> [B, 4H]
    new = _cell_update(attention_dim, gate_dim, h_proj, z_emb_t, z_ctx, c)
    return new, (new[0], context, alpha, h, c, h_proj, z_ctx)

  _, (hs, contexts, alphas, h_in, c_in, h_proj, z_ctx) = jax.lax.scan(
      body, carry, z_emb)
  residuals = (w_h, w_ctx, small, features, features_proj, z_emb, contexts,
               h_in, c_in, h_proj, z_ctx)
  return (hs, contexts, alphas), residuals


def _recurrence_bwd(attention_dim, gate_dim, residuals, cotangents):
  """Reverse scan for the state gradients; weight gradients after it.

  Autodiff of the scan would add a rank-B update ([H, B] @ [B, N]) to each
  weight gradient at every step. Here the scan only emits the per-step
  cotangents of the two matmul outputs, and each weight gradient is one
  matmul over all B x T rows afterwards, where the CPU runs near its peak.
  """
  (w_h, w_ctx, small, features, features_proj, z_emb, contexts, h_in, c_in,
   h_proj, z_ctx) = residuals
  ct_hs, ct_contexts, ct_alphas = cotangents

  def body(acc, xs):
    dh, dc, d_small, d_features, d_proj = acc
    (h_proj_t, z_emb_t, z_ctx_t, c_t, ct_h, ct_context, ct_alpha) = xs
    _, cell_vjp = jax.vjp(
        lambda hp, ze, zc, c: _cell_update(attention_dim, gate_dim, hp, ze,
                                           zc, c),
        h_proj_t, z_emb_t, z_ctx_t, c_t)
    d_hp_cell, d_z_emb, d_z_ctx, dc = cell_vjp((dh + ct_h, dc))
    _, attend_vjp = jax.vjp(
        lambda sm, f, fp, hp: _attend_and_gate(attention_dim, gate_dim, sm,
                                               f, fp, hp),
        small, features, features_proj, h_proj_t)
    d_sm, d_f, d_fp, d_hp_att = attend_vjp(
        (ct_context + d_z_ctx @ w_ctx.T, ct_alpha))
    d_h_proj = d_hp_cell + d_hp_att  # [B, A (+ C | 1) + 4H]
    acc = (d_h_proj @ w_h.T, dc, jax.tree.map(jnp.add, d_small, d_sm),
           d_features + d_f, d_proj + d_fp)
    return acc, (d_h_proj, d_z_emb, d_z_ctx)

  # zeros_like keeps each value's device variance under shard_map/pmap.
  init = jax.tree.map(jnp.zeros_like,
                      (c_in[0], c_in[0], small, features, features_proj))
  (dh, dc, d_small, d_features, d_proj), (d_h_proj, d_z_emb, d_z_ctx) = (
      jax.lax.scan(body, init, (h_proj, z_emb, z_ctx, c_in, ct_hs,
                                ct_contexts, ct_alphas), reverse=True))
  # The weight gradients of the two per-step matmuls, summed over all T
  # steps as one matmul each instead of T rank-B updates inside the loop.
  d_w_h = jnp.einsum("tbh,tbk->hk", h_in, d_h_proj)
  d_w_ctx = jnp.einsum("tbc,tbk->ck", contexts, d_z_ctx)
  return (d_w_h, d_w_ctx, d_small, d_features, d_proj, d_z_emb, (dh, dc))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(attention_dim: int, gate_dim: int, w_h: jax.Array,
                w_ctx: jax.Array, small: Params, features: jax.Array,
                features_proj: jax.Array, z_emb: jax.Array,
                carry: lstm.Carry
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The state-dependent part of the teacher-forced unroll.

  Args:
    attention_dim: A, leading columns of `w_h` (the attention query).
    gate_dim: C, 1 or 0, the gate columns of `w_h` that follow.
    w_h: [H, A + gate_dim + 4H], every matmul on the previous h.
    w_ctx: [C, 4H], the context rows of the LSTM weight.
    small: attention `v` and, with a gate, `gate_b`.
    features: [B, R, C].
    features_proj: [B, R, A].
    z_emb: [T, B, 4H], the embedding part of the LSTM input plus its bias.
    carry: (h0, c0), each [B, H].

  Returns:
    (hs [T, B, H], gated contexts [T, B, C], alphas [T, B, R]).
  """
  return _recurrence_fwd(attention_dim, gate_dim, w_h, w_ctx, small,
                         features, features_proj, z_emb, carry)[0]


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def teacher_forced(params: Params, features: jax.Array, tokens_in: jax.Array,
                   *, dropout_rate: float = 0.0,
                   rng: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Unrolls the decoder over the ground-truth inputs with `lax.scan`.

  Computes what `step` computes at every position, rearranged for speed:
  only the work that depends on the recurrent state stays inside the scan.
  The embedding half of the LSTM input matmul runs once on all [B*T] inputs
  before the scan; the three matmuls on the previous `h` (attention query,
  gate, LSTM recurrence) are one; dropout and the output layer, the biggest
  matmul ([B, E] @ [E, V]), run once on all [B*T] rows after the scan. Step
  t's dropout mask is the one `step` draws with `fold_in(rng, t)`. The
  scan's backward pass is written by hand (a `jax.custom_vjp`) so that the
  weight gradients are one matmul over all steps; as with any custom VJP,
  forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) is not supported.

  Args:
    params: decoder parameters.
    features: [B, R, C] region features (positions are added here).
    tokens_in: [B, T] inputs (BOS followed by the caption).
    dropout_rate: output dropout rate (only with `rng`).
    rng: dropout key; each step folds in its time index.

  Returns:
    (logits [B, T, V], alphas [B, T, R]).
  """
  features = add_positions(params, features)
  features_proj = project_features(params, features)
  carry = init_state(params, features)
  fused = fused_weights(params)
  emb = params["embed"][tokens_in]  # [B, T] -> [B, T, E]
  # Time-major for the scan: [B, T, E] @ [E, 4H] -> [T, B, 4H].
  z_emb = emb.swapaxes(0, 1) @ fused["w_emb"] + fused["lstm_b"]
  attention_dim, gate_dim = _fused_dims(fused["small"])
  hs, contexts, alphas = _recurrence(attention_dim, gate_dim, fused["w_h"],
                                     fused["w_ctx"], fused["small"], features,
                                     features_proj, z_emb, carry)
  if rng is not None and dropout_rate != 0.0:
    steps = jnp.arange(tokens_in.shape[1])
    hs = jax.vmap(lambda h, t: _dropout(h, dropout_rate,
                                        jax.random.fold_in(rng, t)))(hs, steps)
  # Batch-major before the output layer, so the [B, T, V] logits come out
  # in place: [T, B, ...] -> [B, T, ...] on the small tensors only.
  hs = hs.swapaxes(0, 1)
  logits = _output(params, emb, hs, contexts.swapaxes(0, 1))  # [B, T, V]
  return logits, alphas.swapaxes(0, 1)


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
