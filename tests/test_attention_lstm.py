"""Tests of the pure-function attention and LSTM cell."""

import jax
import jax.numpy as jnp
import numpy as np

from visionspeak_jax.models import attention
from visionspeak_jax.models import lstm


def test_attention_weights_sum_to_one_and_match_hand_computation():
  b, r, c, h_dim, a = 3, 5, 4, 6, 7
  params = attention.init(jax.random.key(0), c, h_dim, a)
  rng = np.random.RandomState(0)
  features = rng.randn(b, r, c).astype(np.float32)
  h = rng.randn(b, h_dim).astype(np.float32)
  proj = attention.project_features(params, features)
  context, alpha = attention.attend(params, features, proj, h)
  np.testing.assert_allclose(np.asarray(alpha).sum(-1), np.ones(b), rtol=1e-6)

  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  for i in range(b):
    scores = np.array([
        p["v"] @ np.tanh(features[i, j] @ p["w_f"] + p["b_f"]
                         + h[i] @ p["w_h"]) for j in range(r)])
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    np.testing.assert_allclose(alpha[i], weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(context[i], weights @ features[i], rtol=1e-5,
                               atol=1e-6)


def test_attention_follows_the_query():
  # With one region made to match the query direction, that region wins.
  c = h_dim = a = 4
  params = {"w_f": jnp.eye(c) * 3.0, "b_f": jnp.zeros(a),
            "w_h": jnp.eye(h_dim) * 3.0, "v": jnp.ones(a)}
  features = (-jnp.ones((1, 3, c))).at[0, 1].set(1.0)
  h = jnp.ones((1, h_dim))
  _, alpha = attention.attend(params, features,
                              attention.project_features(params, features), h)
  assert int(alpha.argmax()) == 1


def test_lstm_cell_matches_the_equations():
  i_dim, h_dim, b = 3, 5, 2
  params = lstm.init(jax.random.key(1), i_dim, h_dim)
  rng = np.random.RandomState(1)
  x = rng.randn(b, i_dim).astype(np.float32)
  h = rng.randn(b, h_dim).astype(np.float32)
  c = rng.randn(b, h_dim).astype(np.float32)
  new_h, new_c = lstm.cell(params, (h, c), x)
  w, bias = np.asarray(params["w"]), np.asarray(params["b"])
  z = np.concatenate([x, h], -1) @ w + bias
  sig = lambda v: 1 / (1 + np.exp(-v))
  zi, zf, zg, zo = np.split(z, 4, -1)
  want_c = sig(zf) * c + sig(zi) * np.tanh(zg)
  np.testing.assert_allclose(new_c, want_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_h, sig(zo) * np.tanh(want_c), rtol=1e-5,
                             atol=1e-6)
  # The forget bias starts at one.
  np.testing.assert_array_equal(bias[h_dim:2 * h_dim], np.ones(h_dim))


def test_lstm_scan_equals_python_loop():
  i_dim, h_dim, b, t = 3, 4, 2, 6
  params = lstm.init(jax.random.key(2), i_dim, h_dim)
  xs = jax.random.normal(jax.random.key(3), (t, b, i_dim))
  carry0 = (jnp.zeros((b, h_dim)), jnp.zeros((b, h_dim)))
  (h_scan, c_scan), hs = jax.jit(lstm.unroll)(params, carry0, xs)
  carry = carry0
  for step in range(t):
    carry = lstm.cell(params, carry, xs[step])
    np.testing.assert_allclose(hs[step], carry[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h_scan, carry[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c_scan, carry[1], rtol=1e-5, atol=1e-6)
