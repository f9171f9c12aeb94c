"""The decoder's fast paths: the same results as `decoder.step`, less work.

`decoder.step` runs seven matmuls per word as the paper writes them. Here
the weights are regrouped once (`FusedWeights`: every matmul on the
previous h becomes one) and two rearrangements use them:

- `teacher_forced` (training): only the work that depends on the recurrent
  state stays inside the `lax.scan`; the word embeddings, dropout and the
  output layer run once on all B x T rows, and the scan's backward pass is
  written by hand (`jax.custom_vjp`) so that each weight gradient is one
  matmul over all steps.
- `decode_step` (greedy, beam search, sampling): `DecodingWeights`, built
  once per checkpoint, add a [V, 4H] table for the word half of the LSTM
  input and optionally bfloat16 matmul weights; the K hypotheses of an
  image share one copy of its features.

The tests hold both equal to `decoder.step`.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from visionspeak_jax.models import attention
from visionspeak_jax.models import decoder
from visionspeak_jax.models import lstm
from visionspeak_jax.models import precision

Params = dict[str, Any]


@flax.struct.dataclass
class FusedWeights:
  """The decoder's recurrent weights regrouped by the input they multiply.

  A = attention size, G = gate columns (C for the vector gate, 1 for the
  scalar one, 0 without a gate), H = LSTM size, E = embedding, C = channels.
  """
  w_emb: jax.Array  # [E, 4H], the embedding rows of the LSTM weight
  w_ctx: jax.Array  # [C, 4H], the context rows of the LSTM weight
  w_h: jax.Array  # [H, A + G + 4H]: attention query, gate, LSTM recurrence
  lstm_b: jax.Array  # [4H]
  vectors: Params  # `v` [A] (attention scores) and, with a gate, `gate_b` [G]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split_rows(w: jax.Array, sizes: tuple[int, ...]
                ) -> tuple[jax.Array, ...]:
  """`w`'s consecutive row blocks of `sizes` rows each.

  The gradient of a slice is a zero-padded copy of the whole matrix; summed
  over the blocks, XLA builds the LSTM weight's gradient ([E + C + H, 4H],
  25 MB at the COCO sizes) with pads and adds in every training step. This
  VJP concatenates the blocks' gradients instead: one copy, same values.
  """
  blocks, start = [], 0
  for size in sizes:
    blocks.append(w[start:start + size])
    start += size
  return tuple(blocks)


def _split_rows_fwd(w, sizes):
  return _split_rows(w, sizes), None


def _split_rows_bwd(sizes, _, cotangents):
  del sizes
  return (jnp.concatenate(cotangents, axis=0),)


_split_rows.defvjp(_split_rows_fwd, _split_rows_bwd)


def fused_weights(params: Params) -> FusedWeights:
  """Regroups decoder parameters; build once, outside any loop.

  Args:
    params: decoder parameters (`decoder.init`).

  Returns:
    The `FusedWeights`.
  """
  embed_dim = params["embed"].shape[1]
  w_lstm = params["lstm"]["w"]  # [E + C + H, 4H], rows [embedding; context; h]
  hidden_dim = w_lstm.shape[1] // 4
  w_emb, w_ctx, w_hh = _split_rows(
      w_lstm, (embed_dim, w_lstm.shape[0] - embed_dim - hidden_dim,
               hidden_dim))
  w_h = [params["attention"]["w_h"], w_hh]
  vectors = {"v": params["attention"]["v"]}
  if "gate" in params:
    w_h.insert(1, params["gate"]["w"])
    vectors["gate_b"] = params["gate"]["b"]
  return FusedWeights(w_emb=w_emb, w_ctx=w_ctx,
                      w_h=jnp.concatenate(w_h, axis=1),
                      lstm_b=params["lstm"]["b"], vectors=vectors)


@flax.struct.dataclass
class DecodingWeights:
  """Everything `decode_step` and its set-up read (`decoding_weights`).

  Matmul weights are in the matmul dtype (float32 or bfloat16); biases, the
  tables and all elementwise work stay float32.
  """
  word_gates: jax.Array  # [V, 4H] float32: embed @ w_emb + lstm_b
  w_ctx: jax.Array  # [C, 4H], matmul dtype
  w_h: jax.Array  # [H, A + G + 4H], matmul dtype
  vectors: Params  # `FusedWeights.vectors`
  embed: jax.Array  # [V, E], for the deep output
  # Decoder-like subtrees for `decoder.add_positions`, `init_state` and
  # `project_features`: init_h, init_c, attention {w_f (matmul dtype), b_f}
  # and, when the decoder has one, positions.
  setup: Params
  output: Params  # the decoder's `deep` or `out` subtree, `w`s cast
  # How each step reads the regions (`attention.KINDS`): "hard", its most
  # likely region (see `decode_step`), or "soft", the alpha-weighted context.
  attention: str = flax.struct.field(pytree_node=False, default="soft")


def decoding_weights(params: Params, matmul_dtype: Any = None,
                     attention_kind: str = "soft") -> DecodingWeights:
  """Prepares decoder parameters for decoding; build once per checkpoint.

  On top of `fused_weights`, the embedding half of the LSTM input becomes a
  table, `word_gates` [V, 4H] = embed @ W_emb + b: one [V, E] @ [E, 4H]
  matmul here instead of one [N, E] @ [E, 4H] at every step. The caption
  CLI and an evaluation pass build it once and reuse it for every batch.

  Args:
    params: decoder parameters.
    matmul_dtype: None keeps float32; a lower precision (bfloat16) casts
      every matmul weight, and the inputs are cast to match. The products
      still accumulate in float32.
    attention_kind: how decoding reads the regions (`attention.KINDS`):
      "soft", or "hard" (the most likely region, for a decoder trained with
      hard attention).

  Returns:
    The `DecodingWeights`.
  """
  if attention_kind not in attention.KINDS:
    raise ValueError(f"attention_kind must be one of {attention.KINDS}, got "
                     f"{attention_kind!r}.")
  fused = fused_weights(params)
  dtype = jnp.float32 if matmul_dtype is None else matmul_dtype
  setup = {"init_h": params["init_h"], "init_c": params["init_c"],
           "attention": {"w_f": params["attention"]["w_f"].astype(dtype),
                         "b_f": params["attention"]["b_f"]}}
  if "positions" in params:
    setup["positions"] = params["positions"]
  output = {name: jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype)
      if path[-1] == jax.tree_util.DictKey("w") else x, params[name])
            for name in ("deep", "out") if name in params}
  return DecodingWeights(
      # [V, E] @ [E, 4H] -> [V, 4H], in the matmul precision.
      word_gates=precision.matmul(params["embed"], fused.w_emb.astype(dtype))
      + fused.lstm_b,
      w_ctx=fused.w_ctx.astype(dtype), w_h=fused.w_h.astype(dtype),
      vectors=fused.vectors, embed=params["embed"], setup=setup, output=output,
      attention=attention_kind)


def decoding_start(weights: DecodingWeights, features: jax.Array
                   ) -> tuple[jax.Array, jax.Array, lstm.Carry]:
  """Per-image set-up of decoding: positions, projection, initial state.

  Args:
    weights: `decoding_weights(...)`.
    features: [B, R, C] region features.

  Returns:
    (features [B, R, C] with positions added, projected features [B, R, A],
    initial (h, c), each [B, H]).
  """
  features = decoder.add_positions(weights.setup, features)
  return (features, decoder.project_features(weights.setup, features),
          decoder.init_state(weights.setup, features))


def decode_step(weights: DecodingWeights, features: jax.Array,
                features_proj: jax.Array, carry: lstm.Carry,
                prev_tokens: jax.Array
                ) -> tuple[jax.Array, lstm.Carry, jax.Array]:
  """`decoder.step` for decoding: same result, less work.

  Four matmuls on the state instead of seven, a table lookup for the word,
  and the K hypotheses of an image (a beam) share one copy of its
  features. No dropout.

  Hard attention (`weights.attention`) decodes deterministically with the most
  likely region: each step reads the one region of largest alpha (the
  mode of the distribution training samples from; the paper's Theano code
  offers it, `argmax=True`, beside the expected context). The returned
  alpha is then the one-hot of that region: the map shows what the decoder
  read.

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
  attention_dim, gate_dim = _dims(weights.vectors)
  h_proj = precision.matmul(h, weights.w_h)  # [B*K, H] -> [B*K, A + G + 4H]
  regions = None
  # Gumbel noise of zeros: the most likely region.
  if weights.attention == "hard":
    regions = attention.Regions(
        gumbel=jnp.zeros((h.shape[0], features.shape[1])),
        hard=jnp.ones((h.shape[0],)))
  context, _, alpha, region = _attend_and_gate(
      attention_dim, gate_dim, weights.vectors, features, features_proj,
      h_proj, regions)
  if weights.attention == "hard":
    alpha = jax.nn.one_hot(region, features.shape[1], dtype=alpha.dtype)
  carry = lstm.apply_gates(_lstm_input(
      attention_dim, gate_dim, h_proj,
      weights.word_gates[prev_tokens],  # [B*K, 4H]
      precision.matmul(context, weights.w_ctx)), c)
  emb = weights.embed[prev_tokens]  # [B*K] -> [B*K, E]
  return (decoder.output_logits(weights.output, emb, carry[0], context),
          carry, alpha)


def _dims(vectors: Params) -> tuple[int, int]:
  """(A, G) of a fused `w_h`, read from the shapes in `vectors`."""
  return (vectors["v"].shape[0],
          vectors["gate_b"].shape[0] if "gate_b" in vectors else 0)


def _gate(attention_dim: int, gate_dim: int, vectors: Params,
          h_proj: jax.Array) -> jax.Array:
  """The context gate sigmoid(h @ w_gate + b) [B, G] from the fused rows."""
  return jax.nn.sigmoid(h_proj[:, attention_dim:attention_dim + gate_dim]
                        + vectors["gate_b"])


def _attend_and_gate(attention_dim: int, gate_dim: int, vectors: Params,
                     features: jax.Array, features_proj: jax.Array,
                     h_proj: jax.Array,
                     regions: attention.Regions | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array,
                                jax.Array | None]:
  """(Gated context [B, C], context before the gate, alpha [B, R], regions).

  From the fused `h @ w_h` rows; see `attention.attend_query`.
  """
  context, alpha, region = attention.attend_query(
      {"v": vectors["v"]}, features, features_proj, h_proj[:, :attention_dim],
      regions)
  gated = context
  if gate_dim:
    gated = context * _gate(attention_dim, gate_dim, vectors, h_proj)
  return gated, context, alpha, region


def _lstm_input(attention_dim: int, gate_dim: int, h_proj: jax.Array,
                z_emb_t: jax.Array, z_ctx: jax.Array) -> jax.Array:
  """The LSTM pre-activation [B, 4H] from its three parts."""
  return z_emb_t + z_ctx + h_proj[:, attention_dim + gate_dim:]


def _step_regions(regions: attention.Regions | None, gumbel_t: jax.Array
                  ) -> attention.Regions | None:
  return None if regions is None else regions._replace(gumbel=gumbel_t)


def _recurrence_fwd(attention_dim, gate_dim, w_h, w_ctx, vectors, features,
                    features_proj, z_emb, carry, regions):
  """The scan of `_recurrence`, also returning what its backward pass needs.

  The step inputs (h, c), the fused matmul's output, the LSTM
  pre-activation and (with a gate) the context before the gate are kept,
  so the backward pass recomputes only the attention's tanh.
  """

  def body(carry, xs):
    z_emb_t, gumbel_t = xs
    h, c = carry
    h_proj = precision.matmul(h, w_h)  # [B, H] -> [B, A (+ C | 1) + 4H]
    context, raw, alpha, region = _attend_and_gate(
        attention_dim, gate_dim, vectors, features, features_proj, h_proj,
        _step_regions(regions, gumbel_t))
    z = _lstm_input(attention_dim, gate_dim, h_proj, z_emb_t,
                    precision.matmul(context, w_ctx))  # [B, C] @ [C, 4H]
    new = lstm.apply_gates(z, c)
    return new, (new[0], context, alpha, region,
                 raw if gate_dim else None, h, c, h_proj, z)

  gumbel = None if regions is None else regions.gumbel  # [T, B, R]
  _, (hs, contexts, alphas, chosen, raw, h_in, c_in, h_proj, z) = (
      jax.lax.scan(body, carry, (z_emb, gumbel)))
  residuals = (w_h, w_ctx, vectors, features, features_proj, contexts, raw,
               alphas, chosen, h_in, c_in, h_proj, z, regions)
  return (hs, contexts, alphas, chosen), residuals


def _recurrence_bwd(attention_dim, gate_dim, residuals, cotangents):
  """Reverse scan for the state gradients; weight gradients after it.

  Autodiff of the scan would add a rank-B update ([H, B] @ [B, N]) to each
  weight gradient at every step. Here the scan only emits the per-step
  cotangents of the two matmul outputs, and each weight gradient is one
  matmul over all B x T rows afterwards, where the CPU runs near its peak.
  The attention's backward pass is written out too: autodiff would
  recompute the context (one more pass over the [B, R, C] features per
  step) and add the features' gradient into a [B, R, C] carry at every
  step; here that gradient is one batched matmul after the scan.
  """
  (w_h, w_ctx, vectors, features, features_proj, contexts, raw, alphas,
   chosen, h_in, c_in, h_proj, z, regions) = residuals
  # The chosen regions are integers: no cotangent to carry.
  ct_hs, ct_contexts, ct_alphas, _ = cotangents
  a, g = attention_dim, gate_dim
  v = vectors["v"]
  # Each step multiplies by both weights transposed. XLA's CPU kernels run
  # `x @ w.T` well below `x @ w` on these M = B rows (docs/performance.md),
  # so the transposes are made once here. The first barrier keeps XLA from
  # fusing them with the slicing of the LSTM weight (a slow strided copy),
  # the second from folding them back into the loop's matmuls.
  w_h_t, w_ctx_t = jax.lax.optimization_barrier(
      tuple(w.T for w in jax.lax.optimization_barrier((w_h, w_ctx))))
  # What each step's features were mixed with: alpha, or for hard
  # attention the chosen region's one-hot where `hard` is 1 (it passes no
  # gradient to alpha: the REINFORCE term teaches where to look).
  keep = weights = None  # Soft attention: alpha, all of it.
  if regions is not None:
    hard = regions.hard[:, None]  # [B, 1]
    keep = 1.0 - hard
    weights = attention.mix_weights(alphas, chosen, hard)

  def body(acc, xs):
    dh, dc, d_v, d_gate_b, d_proj = acc
    h_proj_t, z_t, c_t, raw_t, alpha_t, ct_h, ct_context, ct_alpha = xs
    _, cell_vjp = jax.vjp(lstm.apply_gates, z_t, c_t)
    d_z, dc = cell_vjp((dh + ct_h, dc))  # Also the z_emb and z_ctx parts'.
    d_context = ct_context + precision.matmul(d_z, w_ctx_t)  # [B, C]
    d_h_proj = [d_z]
    if g:  # context = raw * sigmoid(gate)
      gate = _gate(a, g, vectors, h_proj_t)
      d_gate = d_context * raw_t * gate * (1.0 - gate)  # [B, C]
      if g == 1:  # The scalar gate scales every channel.
        d_gate = d_gate.sum(-1, keepdims=True)
      d_gate_b = d_gate_b + d_gate.sum(0)
      d_h_proj.insert(0, d_gate)
      d_context = d_context * gate
    # context = sum_r weights_r f_r; alpha = softmax(v . tanh(fp + q)).
    d_alpha = jnp.einsum("bc,brc->br", d_context, features)
    if keep is not None:
      d_alpha = keep * d_alpha
    d_alpha = d_alpha + ct_alpha
    d_scores = alpha_t * (d_alpha - (alpha_t * d_alpha).sum(-1,
                                                            keepdims=True))
    t = jnp.tanh(features_proj + h_proj_t[:, None, :a])  # [B, R, A]
    d_v = d_v + jnp.einsum("br,bra->a", d_scores, t)
    d_pre = d_scores[..., None] * v * (1.0 - t * t)  # [B, R, A]
    d_h_proj.insert(0, d_pre.sum(1))  # The query's gradient [B, A].
    d_h_proj = jnp.concatenate(d_h_proj, axis=-1)  # [B, A (+ C | 1) + 4H]
    acc = (precision.matmul(d_h_proj, w_h_t), dc, d_v, d_gate_b,
           d_proj + d_pre)
    return acc, (d_h_proj, d_z, d_context)

  # zeros_like keeps each value's device variance under shard_map/pmap.
  init = jax.tree.map(jnp.zeros_like, (
      c_in[0], c_in[0], v, vectors.get("gate_b", jnp.zeros(())),
      features_proj))
  (dh, dc, d_v, d_gate_b, d_proj), (d_h_proj, d_z, d_context) = (
      jax.lax.scan(body, init, (h_proj, z, c_in, raw, alphas, ct_hs,
                                ct_contexts, ct_alphas), reverse=True))
  d_vectors = {"v": d_v}
  if g:
    d_vectors["gate_b"] = d_gate_b
  # The features' gradient, summed over steps as one batched matmul (XLA
  # drops it where the features need none).
  d_features = jnp.einsum("tbr,tbc->brc",
                          alphas if weights is None else weights, d_context)
  # The weight gradients of the two per-step matmuls, summed over all T
  # steps as one matmul each instead of T rank-B updates inside the loop.
  d_w_h = _weight_gradient("tbh,tbk->hk", h_in, d_h_proj, w_h.dtype)
  d_w_ctx = _weight_gradient("tbc,tbk->ck", contexts, d_z, w_ctx.dtype)
  # The noise and the hard/soft choice are sampled inputs: no gradient.
  d_regions = jax.tree.map(jnp.zeros_like, regions)
  return (d_w_h, d_w_ctx, d_vectors, d_features.astype(features.dtype),
          d_proj, d_z, (dh, dc), d_regions)


def _weight_gradient(spec: str, x: jax.Array, dy: jax.Array, dtype: Any
                     ) -> jax.Array:
  """A weight's gradient `einsum(spec, x, dy)` in the weight's dtype.

  The inputs are cast to it (as in the forward matmul) and summed in
  float32; the result is cast back because a custom VJP returns each
  cotangent in its input's dtype (the cast to the weight's dtype in
  `decoder.cast_matmul_weights` then carries it to the float32 parameter).
  """
  return jnp.einsum(spec, x.astype(dtype), dy.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(attention_dim: int, gate_dim: int, w_h: jax.Array,
                w_ctx: jax.Array, vectors: Params, features: jax.Array,
                features_proj: jax.Array, z_emb: jax.Array,
                carry: lstm.Carry, regions: attention.Regions | None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """The state-dependent part of the teacher-forced unroll.

  Args:
    attention_dim: A, leading columns of `w_h` (the attention query).
    gate_dim: C, 1 or 0, the gate columns of `w_h` that follow.
    w_h: [H, A + gate_dim + 4H], every matmul on the previous h.
    w_ctx: [C, 4H], the context rows of the LSTM weight.
    vectors: attention `v` and, with a gate, `gate_b`.
    features: [B, R, C].
    features_proj: [B, R, A].
    z_emb: [T, B, 4H], the embedding part of the LSTM input plus its bias.
    carry: (h0, c0), each [B, H].
    regions: None (soft attention), or hard attention's `attention.Regions`
      with `gumbel` [T, B, R] (one noise per step) and `hard` [B].

  Returns:
    (hs [T, B, H], gated contexts [T, B, C], alphas [T, B, R], chosen
    regions [T, B] int32 or None).
  """
  return _recurrence_fwd(attention_dim, gate_dim, w_h, w_ctx, vectors,
                         features, features_proj, z_emb, carry, regions)[0]


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def teacher_forced(params: Params, features: jax.Array, tokens_in: jax.Array,
                   *, dropout_rate: float = 0.0,
                   rng: jax.Array | None = None, dtype: Any = None,
                   regions: attention.Regions | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Unrolls the decoder over the ground-truth inputs with `lax.scan`.

  Computes what `decoder.step` computes at every position, rearranged for
  speed: only the work that depends on the recurrent state stays inside the
  scan.
  The embedding half of the LSTM input matmul runs once on all [B*T] inputs
  before the scan; the three matmuls on the previous `h` (attention query,
  gate, LSTM recurrence) are one; dropout and the output layer, the biggest
  matmul ([B, E] @ [E, V]), run once on all [B*T] rows after the scan. Step
  t's dropout mask is the one `decoder.step` draws with `fold_in(rng, t)`.
  The scan's backward pass is written by hand (a `jax.custom_vjp`) so that the
  weight gradients are one matmul over all steps; as with any custom VJP,
  forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) is not supported.

  Args:
    params: decoder parameters.
    features: [B, R, C] region features (positions are added here).
    tokens_in: [B, T] inputs (BOS followed by the caption).
    dropout_rate: output dropout rate (only with `rng`).
    rng: dropout key; each step folds in its time index.
    dtype: matmul input dtype: None (float32) or bfloat16 for mixed
      precision (`decoder.cast_matmul_weights`: products, the recurrent
      state, softmax and logits stay float32).
    regions: None for soft attention; for hard attention, how each step
      picks its region: `attention.Regions` with `gumbel` [B, T, R] (step
      t's noise; standard Gumbel samples from alpha, zeros take the most
      likely region) and `hard` [B].

  Returns:
    (logits [B, T, V] float32, alphas [B, T, R] float32, regions [B, T]
    int32 that hard attention chose, None without `regions`).
  """
  params = decoder.cast_matmul_weights(params, dtype)
  features = decoder.add_positions(params, features)
  features_proj = decoder.project_features(params, features)
  carry = decoder.init_state(params, features)
  fused = fused_weights(params)
  emb = params["embed"][tokens_in]  # [B, T] -> [B, T, E]
  # Time-major for the scan: [B, T, E] @ [E, 4H] -> [T, B, 4H].
  z_emb = precision.matmul(emb.swapaxes(0, 1), fused.w_emb) + fused.lstm_b
  attention_dim, gate_dim = _dims(fused.vectors)
  if regions is not None:  # Time-major noise for the scan.
    regions = regions._replace(gumbel=regions.gumbel.swapaxes(0, 1))
  hs, contexts, alphas, chosen = _recurrence(
      attention_dim, gate_dim, fused.w_h, fused.w_ctx, fused.vectors, features,
      features_proj, z_emb, carry, regions)
  if rng is not None and dropout_rate != 0.0:
    steps = jnp.arange(tokens_in.shape[1])
    hs = jax.vmap(lambda h, t: decoder.dropout(
        h, dropout_rate, jax.random.fold_in(rng, t)))(hs, steps)
  # Batch-major before the output layer, so the [B, T, V] logits come out
  # in place: [T, B, ...] -> [B, T, ...] on the small tensors only.
  hs = hs.swapaxes(0, 1)
  logits = decoder.output_logits(params, emb, hs,
                                 contexts.swapaxes(0, 1))  # [B, T, V]
  return (logits, alphas.swapaxes(0, 1),
          None if chosen is None else chosen.swapaxes(0, 1))


