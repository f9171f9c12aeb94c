"""Tests of the SAT decoder and its fast paths: unroll, gates, deep output,
loss, decoding step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionspeak_jax.models import attention
from visionspeak_jax.models import decoder
from visionspeak_jax.models import fast_decoder


def _params(gate="vector", deep_output=True, vocab=11, num_regions=0):
  return decoder.init(jax.random.key(0), vocab_size=vocab, feature_dim=6,
                      embed_dim=5, hidden_dim=7, attention_dim=4, gate=gate,
                      deep_output=deep_output, num_regions=num_regions)


def _hard_regions(b, t, r):
  """Hard attention's choice for [B, T] steps: rows 0 and 2 sample."""
  return attention.Regions(
      gumbel=jax.random.gumbel(jax.random.key(9), (b, t, r)),
      hard=jnp.array([1.0, 0.0, 1.0])[:b])


def _step_regions(regions, t):
  return None if regions is None else regions._replace(
      gumbel=regions.gumbel[:, t])


@pytest.mark.parametrize("gate,deep,regions,hard", [
    ("vector", True, 0, False), ("scalar", False, 0, False),
    ("none", True, 4, False), ("vector", True, 0, True),
    ("scalar", True, 4, True)])
def test_teacher_forced_scan_equals_python_loop(gate, deep, regions, hard):
  params = _params(gate, deep, num_regions=regions)
  b, r, t = 3, 4, 5
  features = jax.random.normal(jax.random.key(1), (b, r, 6))
  tokens = jax.random.randint(jax.random.key(2), (b, t), 0, 11)
  choice = _hard_regions(b, t, r) if hard else None
  logits, alphas, chosen = jax.jit(fast_decoder.teacher_forced)(
      params, features, tokens, regions=choice)
  assert logits.shape == (b, t, 11) and alphas.shape == (b, t, r)
  assert (chosen is None) == (not hard)

  features = decoder.add_positions(params, features)
  proj = decoder.project_features(params, features)
  carry = decoder.init_state(params, features)
  for step in range(t):
    step_logits, carry, alpha = decoder.step(
        params, features, proj, carry, tokens[:, step],
        regions=_step_regions(choice, step))
    np.testing.assert_allclose(logits[:, step], step_logits, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(alphas[:, step], alpha, rtol=1e-5, atol=1e-6)
    if hard:  # The Gumbel-max sample of alpha.
      np.testing.assert_array_equal(
          chosen[:, step],
          np.argmax(np.log(alpha) + choice.gumbel[:, step], axis=-1))


def test_gate_shapes_and_unknown_gate():
  assert _params("vector")["gate"]["w"].shape == (7, 6)
  assert _params("scalar")["gate"]["w"].shape == (7, 1)
  assert "gate" not in _params("none")
  assert "deep" in _params(deep_output=True)
  assert "out" in _params(deep_output=False)
  with pytest.raises(ValueError, match="gate"):
    _params("sideways")


def test_init_state_uses_mean_features():
  params = _params()
  features = jax.random.normal(jax.random.key(3), (2, 4, 6))
  h0, c0 = decoder.init_state(params, features)
  # Permuting regions leaves the mean, and so the state, unchanged.
  h1, c1 = decoder.init_state(params, features[:, ::-1])
  np.testing.assert_allclose(h0, h1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c0, c1, rtol=1e-5, atol=1e-6)


def test_dropout_only_with_rng():
  params = _params()
  features = jax.random.normal(jax.random.key(4), (2, 4, 6))
  tokens = jnp.ones((2, 3), jnp.int32)
  plain, _, _ = fast_decoder.teacher_forced(params, features, tokens,
                                         dropout_rate=0.5)
  again, _, _ = fast_decoder.teacher_forced(params, features, tokens)
  np.testing.assert_array_equal(plain, again)
  dropped, _, _ = fast_decoder.teacher_forced(params, features, tokens,
                                           dropout_rate=0.5,
                                           rng=jax.random.key(5))
  assert not np.allclose(plain, dropped)


def test_loss_ignores_padding():
  b, t, v, r = 2, 4, 6, 3
  rng = np.random.RandomState(0)
  logits = rng.randn(b, t, v).astype(np.float32)
  targets = np.array([[3, 4, 2, 0], [5, 2, 0, 0]])
  mask = (targets != 0).astype(np.float32)
  alphas = np.full((b, t, r), 1.0 / r, np.float32)
  terms = decoder.loss_terms(logits, targets, mask, alphas)
  # Garbage at padded positions changes nothing.
  logits2 = logits.copy()
  logits2[0, 3] = 100.0
  logits2[1, 2:] = -50.0
  alphas2 = alphas.copy()
  alphas2[1, 2:] = [1.0, 0.0, 0.0]
  terms2 = decoder.loss_terms(logits2, targets, mask, alphas2)
  for k in terms:
    np.testing.assert_allclose(terms[k], terms2[k], rtol=1e-6)
  # Hand computation of the token count and cross-entropy.
  assert float(terms["tokens"]) == 5.0
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -sum(logp[i, j, targets[i, j]] for i in range(b) for j in range(t)
              if mask[i, j])
  np.testing.assert_allclose(terms["xent_sum"], want, rtol=1e-5)
  # Doubly stochastic term: caption 0 puts 3 * 1/3 = 1 on every region
  # (no penalty); caption 1 puts 2/3 on every region.
  np.testing.assert_allclose(terms["attention_sum"], 3 * (1 / 3) ** 2,
                             rtol=1e-5)


def test_position_embedding():
  params = _params(num_regions=4)
  assert params["positions"].shape == (4, 6)
  features = jnp.zeros((2, 4, 6))
  np.testing.assert_allclose(decoder.add_positions(params, features)[1],
                             params["positions"])
  assert "positions" not in _params()
  with pytest.raises(ValueError, match="built for 4 regions"):
    decoder.add_positions(params, jnp.zeros((1, 9, 6)))


def _loop_forward(params, features, tokens, dropout_rate=0.0, rng=None,
                  regions=None):
  """The reference unroll: `decoder.step` in a Python loop (plain autodiff)."""
  features = decoder.add_positions(params, features)
  proj = decoder.project_features(params, features)
  carry = decoder.init_state(params, features)
  logits, alphas = [], []
  for t in range(tokens.shape[1]):
    step_rng = None if rng is None else jax.random.fold_in(rng, t)
    out, carry, alpha = decoder.step(params, features, proj, carry,
                                     tokens[:, t], dropout_rate=dropout_rate,
                                     rng=step_rng,
                                     regions=_step_regions(regions, t))
    logits.append(out)
    alphas.append(alpha)
  return jnp.stack(logits, 1), jnp.stack(alphas, 1), None


@pytest.mark.parametrize("gate,deep,regions,dropout,hard", [
    ("vector", True, 4, 0.0, False), ("scalar", False, 0, 0.3, False),
    ("none", True, 0, 0.3, False), ("vector", True, 0, 0.3, True)])
def test_teacher_forced_gradients_match_step_by_step_autodiff(
    gate, deep, regions, dropout, hard):
  params = _params(gate, deep, num_regions=regions)
  b, r, t = 3, 4, 5
  features = jax.random.normal(jax.random.key(1), (b, r, 6))
  tokens = jax.random.randint(jax.random.key(2), (b, t), 0, 11)
  targets = jax.random.randint(jax.random.key(3), (b, t), 0, 11)
  mask = jnp.ones((b, t)).at[0, 3:].set(0.0)
  rng = jax.random.key(4) if dropout else None
  choice = _hard_regions(b, t, r) if hard else None

  def loss(forward, params, features):
    logits, alphas, _ = forward(params, features, tokens,
                                dropout_rate=dropout, rng=rng, regions=choice)
    terms = decoder.loss_terms(logits, targets, mask, alphas)
    total = terms["xent_sum"] + 0.7 * terms["attention_sum"]
    if hard:  # What hard attention's REINFORCE and entropy terms read.
      total += 0.3 * (jnp.log(alphas) * alphas).sum() + 0.2 * (
          jnp.log(alphas) * jax.nn.one_hot(
              jnp.argmax(jnp.log(alphas) + choice.gumbel, -1), r)).sum()
    return total

  fast = jax.jit(jax.grad(lambda p, f: loss(fast_decoder.teacher_forced, p, f),
                          argnums=(0, 1)))(params, features)
  slow = jax.grad(lambda p, f: loss(_loop_forward, p, f),
                  argnums=(0, 1))(params, features)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5), fast, slow)


@pytest.mark.parametrize("gate,deep,regions", [
    ("vector", True, 0), ("scalar", False, 4), ("none", True, 0)])
def test_decode_step_equals_step(gate, deep, regions):
  """The decoding form: fused weights, word table, K rows sharing features."""
  params = _params(gate, deep, num_regions=regions)
  b, k, r = 2, 3, 4
  keys = jax.random.split(jax.random.key(5), 4)
  features = decoder.add_positions(
      params, jax.random.normal(keys[0], (b, r, 6)))
  carry = (jax.random.normal(keys[1], (b * k, 7)),
           jax.random.normal(keys[2], (b * k, 7)))
  tokens = jax.random.randint(keys[3], (b * k,), 0, 11)
  # The reference sees every image's features once per hypothesis.
  want = decoder.step(params, jnp.repeat(features, k, axis=0),
                      jnp.repeat(decoder.project_features(params, features),
                                 k, axis=0), carry, tokens)

  weights = fast_decoder.decoding_weights(params)
  assert weights.word_gates.shape == (11, 4 * 7)
  got = jax.jit(fast_decoder.decode_step)(
      weights, features, decoder.project_features(weights.setup, features),
      carry, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5), got, want)

  # bfloat16 matmul inputs: the weights are cast, the results stay float32
  # and close to the float32 ones.
  weights = fast_decoder.decoding_weights(params, jnp.bfloat16)
  assert weights.w_h.dtype == jnp.bfloat16
  assert weights.word_gates.dtype == jnp.float32
  got = jax.jit(fast_decoder.decode_step)(
      weights, features, decoder.project_features(weights.setup, features),
      carry, tokens)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


def test_hard_attention_decodes_with_the_most_likely_region():
  params = _params()
  b, k, r = 2, 3, 4
  keys = jax.random.split(jax.random.key(6), 4)
  features = jax.random.normal(keys[0], (b, r, 6))
  carry = (jax.random.normal(keys[1], (b * k, 7)),
           jax.random.normal(keys[2], (b * k, 7)))
  tokens = jax.random.randint(keys[3], (b * k,), 0, 11)
  proj = decoder.project_features(params, features)
  _, _, soft_alpha = decoder.step(params, jnp.repeat(features, k, axis=0),
                                  jnp.repeat(proj, k, axis=0), carry, tokens)
  want = decoder.step(
      params, jnp.repeat(features, k, axis=0), jnp.repeat(proj, k, axis=0),
      carry, tokens, regions=attention.Regions(jnp.zeros((b * k, r)),
                                               jnp.ones((b * k,))))
  weights = fast_decoder.decoding_weights(params, attention_kind="hard")
  logits, new_carry, alpha = jax.jit(fast_decoder.decode_step)(
      weights, features, proj, carry, tokens)
  np.testing.assert_allclose(logits, want[0], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               new_carry, want[1])
  # The map is the one region read: the largest weight of soft attention.
  np.testing.assert_array_equal(
      alpha, jax.nn.one_hot(soft_alpha.argmax(-1), r))
  # It differs from the soft step, which mixes every region.
  soft = fast_decoder.decode_step(fast_decoder.decoding_weights(params),
                                  features, proj, carry, tokens)
  assert not np.allclose(soft[0], logits)
  with pytest.raises(ValueError, match="attention_kind"):
    fast_decoder.decoding_weights(params, attention_kind="medium")
