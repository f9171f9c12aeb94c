"""Tests of greedy, beam search and sampling over hand-written step functions.

No model is involved: every step function below is a small table lookup, so
the best caption and its log-probability can be worked out by hand.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visionspeak_jax.models import decoding

PAD, BOS, EOS, A, B, C, D = range(7)
V = 7


def _bigram_step(probs):
  """A step function whose next-word distribution depends on the last word.

  Args:
    probs: {previous word: {word: probability}}; missing entries are 0 and a
      missing row is uniform.

  Returns:
    (step_fn, table) where table [V, V] holds the log-probabilities. The state
    counts the calls, so the final state shows how many steps ran.
  """
  table = np.full((V, V), np.log(1.0 / V), np.float32)
  for prev, row in probs.items():
    table[prev] = -np.inf
    for word, p in row.items():
      table[prev, word] = np.log(p)
  table_j = jnp.asarray(table)

  def step_fn(tokens, calls):
    return table_j[tokens], calls + 1, jnp.zeros((tokens.shape[0], 1))

  return step_fn, table


def _logprob(table, words):
  """Hand sum of bigram log-probabilities of `words` after BOS."""
  return float(sum(table[p, w] for p, w in zip([BOS] + words[:-1], words)))


def _random_step(seed, batch_size, max_length, scale=1.0):
  """Random logits that depend on the image, the time and the last word.

  The logits of each row are a shuffled arange, so the best word always beats
  the next by `scale`: tiny temperatures and tiny top-p pick it for sure.
  """
  rng = np.random.default_rng(seed)
  table = np.argsort(rng.random((batch_size, max_length, V, V)), -1)
  table = jnp.asarray(table * scale, jnp.float32)  # [B, L, V, V]

  def step_fn(tokens, state):
    logits = table[state["image"], state["time"], tokens]  # [B, V]
    alpha = jnp.stack([state["time"], tokens], -1).astype(jnp.float32)
    return logits, dict(image=state["image"], time=state["time"] + 1), alpha

  state = dict(image=jnp.arange(batch_size), time=jnp.zeros(batch_size, int))
  return step_fn, state


def _search(search, step_fn, state, batch_size, beam_size, max_length, **kw):
  """`search` (beam_search or beam_search_loop), jitted, with the test ids."""
  fn = functools.partial(search, step_fn, batch_size=batch_size,
                         beam_size=beam_size, max_length=max_length,
                         bos_id=BOS, eos_id=EOS, pad_id=PAD, **kw)
  return jax.jit(fn)(state)


_beam = functools.partial(_search, decoding.beam_search)
_loop = functools.partial(_search, decoding.beam_search_loop)


def _greedy(step_fn, state, batch_size, max_length, **kw):
  fn = functools.partial(decoding.greedy, step_fn, batch_size=batch_size,
                         max_length=max_length, bos_id=BOS, eos_id=EOS,
                         pad_id=PAD, **kw)
  return jax.jit(fn)(state)


def _sample(step_fn, state, batch_size, max_length, rng, **kw):
  fn = functools.partial(decoding.sample, step_fn, batch_size=batch_size,
                         max_length=max_length, bos_id=BOS, eos_id=EOS,
                         pad_id=PAD, **kw)
  return jax.jit(fn)(state, rng=rng)


# Greedy takes A (0.6) and then A's best, EOS (0.4): 0.24 in all. B (0.4)
# followed by EOS (0.9) is worth 0.36.
_TRAP = {BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.4, C: 0.3, D: 0.3},
         B: {EOS: 0.9, C: 0.1}}


def test_beam_finds_the_best_caption_greedy_misses():
  step_fn, table = _bigram_step(_TRAP)
  calls = jnp.zeros(1, jnp.int32)
  greedy = _greedy(step_fn, calls, 1, 5)
  beam = _beam(step_fn, calls, 1, 2, 5)
  np.testing.assert_array_equal(greedy.tokens[0], [A, EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(beam.tokens[0], [B, EOS, PAD, PAD, PAD])
  np.testing.assert_allclose(beam.scores[0], np.log(0.4) + np.log(0.9),
                             rtol=1e-6)
  np.testing.assert_allclose(beam.scores[0], _logprob(table, [B, EOS]),
                             rtol=1e-6)
  assert beam.lengths[0] == 1 and greedy.lengths[0] == 1
  assert beam.scores[0] > greedy.scores[0]


def test_single_beam_equals_greedy():
  batch, length = 6, 6
  step_fn, state = _random_step(0, batch, length)
  greedy = _greedy(step_fn, state, batch, length)
  beam = _beam(step_fn, state, batch, 1, length)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_array_equal(beam.scores, greedy.scores)
  # The random tables must exercise both ends: captions that stop early and
  # captions that run to max_length.
  lengths = np.asarray(greedy.lengths)
  assert (lengths < length).any() and (lengths == length).any()


def test_early_stop_once_no_live_beam_can_win():
  # Both beams end at step 2 (A EOS 0.45, B EOS 0.27); the best live beam left
  # (A C, 0.05) cannot beat either.
  step_fn, _ = _bigram_step({BOS: {A: 0.5, B: 0.3, EOS: 0.2},
                             A: {EOS: 0.9, C: 0.1}, B: {EOS: 0.9, C: 0.1}})
  calls = jnp.zeros(2, jnp.int32)
  final = _loop(step_fn, calls, 2, 2, 10)
  assert int(final.step) == 2
  # The cache went through the step function exactly twice per beam.
  np.testing.assert_array_equal(final.cache, [2, 2, 2, 2])
  assert bool(final.done.all())
  out = _beam(step_fn, calls, 2, 2, 10)
  np.testing.assert_array_equal(out.tokens, [[A, EOS] + [PAD] * 8] * 2)


def test_no_early_stop_while_a_live_beam_can_still_win():
  # Both slots fill by step 3 (A EOS 0.5, A C EOS 0.05), but the live A C C ...
  # (0.45, then 0.9 per step) still beats the worst of them up to step 6.
  step_fn, _ = _bigram_step({BOS: {A: 1.0}, A: {EOS: 0.5, C: 0.5},
                             C: {C: 0.9, EOS: 0.1}})
  final = _loop(step_fn, jnp.zeros(1, jnp.int32), 1, 2, 6)
  assert int(final.step) == 6
  assert not bool(final.done.any())
  assert np.isfinite(np.asarray(final.finished.scores)).all()


def test_fallback_to_best_live_beam_without_eos():
  step_fn, table = _bigram_step({BOS: {A: 0.7, B: 0.3}, A: {C: 0.6, D: 0.4},
                                 B: {C: 1.0}, C: {D: 0.8, A: 0.2},
                                 D: {A: 0.6, B: 0.4}})
  length = 4
  final = _loop(step_fn, jnp.zeros(1, jnp.int32), 1, 3, length)
  assert int(final.step) == length
  assert not bool(final.done.any())
  assert not np.isfinite(np.asarray(final.finished.scores)).any()
  out = _beam(step_fn, jnp.zeros(1, jnp.int32), 1, 3, length)
  assert int(out.lengths[0]) == length
  assert EOS not in np.asarray(out.tokens[0])
  # Brute force over every EOS-free caption of that length.
  best = max(itertools.product([A, B, C, D], repeat=length),
             key=lambda words: _logprob(table, list(words)))
  np.testing.assert_array_equal(out.tokens[0], best)
  np.testing.assert_allclose(out.scores[0], _logprob(table, list(best)),
                             rtol=1e-6)


def test_length_penalty_prefers_the_longer_caption():
  # Short: EOS at once (0.4, 1 token). Long: A B EOS (0.6 * 0.7 * 0.8 = 0.336,
  # 3 tokens). Raw sums prefer the short one; GNMT with exponent 1 divides by
  # (5 + 1) / 6 = 1 and (5 + 3) / 6 = 4 / 3, and prefers the long one.
  step_fn, table = _bigram_step({BOS: {A: 0.6, EOS: 0.4},
                                 A: {B: 0.7, EOS: 0.3},
                                 B: {EOS: 0.8, C: 0.2}})
  calls = jnp.zeros(1, jnp.int32)
  raw = _beam(step_fn, calls, 1, 2, 6)
  np.testing.assert_array_equal(raw.tokens[0], [EOS] + [PAD] * 5)
  np.testing.assert_allclose(raw.scores[0], np.log(0.4), rtol=1e-6)
  assert int(raw.lengths[0]) == 0
  long = _beam(step_fn, calls, 1, 2, 6, length_penalty=1.0)
  np.testing.assert_array_equal(long.tokens[0], [A, B, EOS] + [PAD] * 3)
  np.testing.assert_allclose(long.scores[0], np.log(0.336) / (8 / 6),
                             rtol=1e-5)
  assert int(long.lengths[0]) == 2


def _trigram_step(seed, batch_size):
  """Per-image random logits over (word before last, last word).

  The state remembers the previous input, so a state that is not gathered by
  parent beam feeds the wrong row of the table and reports the wrong word in
  its alpha [time, last word, word before last].
  """
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(batch_size, V, V, V)).astype(np.float32) * 2
  # Raw log-prob sums favour short captions; a lower EOS keeps the answers
  # varied (seed 1: a full-length one, a 4-word one and a lone EOS).
  table[..., EOS] -= 1.0
  table[..., [PAD, BOS]] = -1e9  # never generated
  table_j = jnp.asarray(table)

  def step_fn(tokens, state):
    logits = table_j[state["image"], state["prev"], tokens]  # [B, V]
    alpha = jnp.stack([state["time"], tokens, state["prev"]], -1)
    new = dict(image=state["image"], time=state["time"] + 1, prev=tokens)
    return logits, new, alpha.astype(jnp.float32)[:, None, :]  # [B, 1, 3]

  state = dict(image=jnp.arange(batch_size),
               time=jnp.zeros(batch_size, jnp.int32),
               prev=jnp.full(batch_size, BOS, jnp.int32))
  logprobs = np.asarray(jax.nn.log_softmax(table_j))
  return step_fn, state, logprobs


def test_alphas_and_scores_follow_the_chosen_beam():
  batch, beams, length = 3, 3, 6
  step_fn, state, logprobs = _trigram_step(1, batch)
  out = _beam(step_fn, state, batch, beams, length)
  greedy = _greedy(step_fn, state, batch, length)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  alphas = np.asarray(out.alphas)[:, :, 0]  # [B, L, 1, 3] -> [B, L, 3]
  assert alphas.shape == (batch, length, 3)
  # The images have different answers, and beam search had to switch beams
  # somewhere, or the test would not exercise the gathering.
  assert len({tuple(row) for row in tokens}) == batch
  assert (tokens != np.asarray(greedy.tokens)).any()
  for i in range(batch):
    n = int(lengths[i]) + (EOS in tokens[i])  # emitted tokens
    history = [BOS, BOS] + list(tokens[i, :n])
    expected = [[t, history[t + 1], history[t]] for t in range(n)]
    np.testing.assert_array_equal(alphas[i, :n], expected)
    np.testing.assert_array_equal(alphas[i, n:], 0)
    np.testing.assert_array_equal(tokens[i, n:], PAD)
    score = sum(logprobs[i, history[t], history[t + 1], history[t + 2]]
                for t in range(n))
    np.testing.assert_allclose(out.scores[i], score, rtol=1e-5)
  assert (lengths < length).any() and (lengths == length).any()


# What the beam search returned before its rewrite around `Hypotheses`, on
# `_trigram_step`: (seed, batch, beams, length, length penalty), steps run,
# tokens, lengths and scores. The first two fall back to a live beam for
# image 0, the third has an image done while the others search on, the last
# stops early.
_BEAM_REFERENCE = [
    ((1, 3, 2, 6, 0.0), 6,
     [[B, A, B, B, D, D], [B, D, B, A, EOS, PAD], [B, B, C, EOS, PAD, PAD]],
     [6, 4, 3], [-3.322293996810913, -2.460071563720703, -2.0464959144592285]),
    ((1, 3, 3, 6, 1.0), 6,
     [[B, A, B, B, D, D], [B, D, B, A, EOS, PAD], [B, B, C, EOS, PAD, PAD]],
     [6, 4, 3],
     [-1.8121603727340698, -1.4760428667068481, -1.3643306493759155]),
    ((2, 3, 4, 6, 0.6), 6,
     [[B, C, EOS, PAD, PAD, PAD], [EOS, PAD, PAD, PAD, PAD, PAD],
      [C, EOS, PAD, PAD, PAD, PAD]],
     [2, 0, 1],
     [-1.5944066047668457, -0.3156716525554657, -1.5706703662872314]),
    ((3, 2, 2, 8, 0.0), 6,
     [[EOS] + [PAD] * 7, [A, EOS] + [PAD] * 6],
     [0, 1], [-1.3150146007537842, -1.2048616409301758]),
]


@pytest.mark.parametrize("config,steps,tokens,lengths,scores",
                         _BEAM_REFERENCE)
def test_beam_search_matches_the_saved_reference(config, steps, tokens,
                                                 lengths, scores):
  seed, batch, beams, length, penalty = config
  step_fn, state, _ = _trigram_step(seed, batch)
  out = _beam(step_fn, state, batch, beams, length, length_penalty=penalty)
  final = _loop(step_fn, state, batch, beams, length, length_penalty=penalty)
  assert int(final.step) == steps
  assert bool(final.done.all()) == (steps < length)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.lengths, lengths)
  # The saved float32 scores came from a CPU; the tolerance only allows for
  # another backend's exp and log.
  np.testing.assert_allclose(out.scores, np.float32(scores), rtol=1e-6)
  # Alpha [time, last word, word before last] per emitted token, then zeros.
  alphas = np.asarray(out.alphas)[:, :, 0]  # [B, L, 1, 3] -> [B, L, 3]
  for i in range(batch):
    n = lengths[i] + (EOS in tokens[i])  # emitted tokens
    history = [BOS, BOS] + tokens[i][:n]
    expected = np.zeros((length, 3), np.float32)
    expected[:n] = [[t, history[t + 1], history[t]] for t in range(n)]
    np.testing.assert_array_equal(alphas[i], expected)


def test_beam_answer_does_not_depend_on_the_batch():
  step_fn, state, _ = _trigram_step(1, 3)
  together = _beam(step_fn, state, 3, 3, 6)
  for i in range(3):
    alone = _beam(step_fn, jax.tree.map(lambda x: x[i:i + 1], state), 1, 3, 6)
    np.testing.assert_array_equal(alone.tokens[0], together.tokens[i])
    np.testing.assert_allclose(alone.scores[0], together.scores[i], rtol=1e-6)


def test_sampling_limits_equal_greedy():
  batch, length = 6, 6
  step_fn, state = _random_step(1, batch, length)
  greedy = _greedy(step_fn, state, batch, length)
  rng = jax.random.key(0)
  for kw in (dict(temperature=1e-3), dict(top_k=1), dict(top_p=1e-3)):
    out = _sample(step_fn, state, batch, length, rng, **kw)
    np.testing.assert_array_equal(out.tokens, greedy.tokens, err_msg=str(kw))
    np.testing.assert_array_equal(out.lengths, greedy.lengths)
    np.testing.assert_allclose(out.scores, greedy.scores, rtol=1e-6)


def test_greedy_and_sample_zero_the_alphas_after_eos():
  batch, length = 6, 6
  step_fn, state = _random_step(0, batch, length)
  outs = [_greedy(step_fn, state, batch, length)]
  rng = jax.random.key(0)
  outs += [_sample(step_fn, state, batch, length, rng, **kw)
           for kw in (dict(temperature=1e-3), dict(top_k=1))]
  for out in outs:
    tokens, alphas = np.asarray(out.tokens), np.asarray(out.alphas)
    np.testing.assert_array_equal(tokens, outs[0].tokens)
    emitted = np.asarray(out.lengths) + (tokens == EOS).any(1)  # [B]
    assert (emitted < length).any()  # Some caption ends early.
    for i in range(batch):
      n = int(emitted[i])
      # Up to the EOS included: the step's [time, input token] map.
      history = [BOS] + list(tokens[i, :n - 1])
      np.testing.assert_array_equal(alphas[i, :n],
                                    [[t, history[t]] for t in range(n)])
      np.testing.assert_array_equal(alphas[i, n:], 0)


def test_sampling_is_reproducible_per_key():
  batch, length = 16, 6
  step_fn, state = _random_step(2, batch, length, scale=0.3)
  first = _sample(step_fn, state, batch, length, jax.random.key(1))
  again = _sample(step_fn, state, batch, length, jax.random.key(1))
  other = _sample(step_fn, state, batch, length, jax.random.key(2))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.scores, again.scores)
  assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any()
  # Scores are the model's log-probabilities of the drawn words.
  tokens = np.asarray(first.tokens)
  assert (np.asarray(first.scores) <= 0).all()
  for i in range(batch):
    n = int(first.lengths[i]) + (EOS in tokens[i])
    np.testing.assert_array_equal(tokens[i, n:], PAD)
    np.testing.assert_array_equal(np.asarray(first.alphas)[i, n:], 0)


def test_top_k_and_top_p_keep_only_the_best_words():
  # Fixed logits: C and D are the two best, well ahead of B, then the rest.
  logits = jnp.array([0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 2.2])

  def step_fn(tokens, state):
    rows = jnp.broadcast_to(logits, (tokens.shape[0], V))
    return rows, state, jnp.zeros((tokens.shape[0], 1))

  batch = 512
  state = jnp.zeros(batch)
  for kw in (dict(top_k=2), dict(top_p=0.6, temperature=0.5)):
    out = _sample(step_fn, state, batch, 4, jax.random.key(3), **kw)
    seen = set(np.unique(np.asarray(out.tokens)).tolist())
    assert seen == {C, D}, kw
  out = _sample(step_fn, state, batch, 4, jax.random.key(3), top_k=3)
  assert set(np.unique(np.asarray(out.tokens)).tolist()) == {B, C, D}


@pytest.mark.parametrize("kw", [dict(temperature=0.0),
                                dict(temperature=-1.0),
                                dict(top_k=-1), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_bad_sampling_arguments_raise(kw):
  step_fn, state = _random_step(0, 2, 3)
  name = next(iter(kw))
  with pytest.raises(ValueError, match=name):
    decoding.sample(step_fn, state, 2, 3, jax.random.key(0), bos_id=BOS,
                    eos_id=EOS, **kw)


@pytest.mark.parametrize("shape,k", [((3, 10000), 10), ((4, 1001), 6),
                                     ((5, 400), 1), ((2, 37), 4)])
def test_top_k_equals_lax_top_k(shape, k):
  """Values and indices, ties (lower index first) and -inf included."""
  x = jax.random.normal(jax.random.key(0), shape)
  ties = jnp.round(x * 2) / 2  # A handful of distinct values.
  masked = jnp.where(x > 0.5, -jnp.inf, x)
  for scores in (x, ties, masked, jnp.full(shape, -jnp.inf)):
    values, indices = jax.jit(decoding.top_k, static_argnums=1)(scores, k)
    want_values, want_indices = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(indices, want_indices)


@pytest.mark.parametrize("shape,k", [((5, 40), 3), ((4, 1000), 6)])
def test_top_k_of_a_symbolic_batch_equals_lax_top_k(shape, k):
  """An exported program (symbolic rows) sorts; the answers are the same."""
  rows, = jax.export.symbolic_shape("rows")
  exported = jax.export.export(
      jax.jit(functools.partial(decoding.top_k, k=k)))(
          jax.ShapeDtypeStruct((rows,) + shape[1:], jnp.float32))
  assert "stablehlo.sort" in exported.mlir_module()
  x = jax.random.normal(jax.random.key(1), shape)
  ties = jnp.round(x * 2) / 2
  masked = jnp.where(x > 0.5, -jnp.inf, x)
  for scores in (x, ties, masked, jnp.full(shape, -jnp.inf)):
    values, indices = exported.call(scores)
    want_values, want_indices = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(indices, want_indices)


def test_beam_first_step_runs_one_row_per_image():
  seen = []
  step_fn, state = _random_step(0, batch_size=3, max_length=4)

  def recording_step(tokens, state):
    seen.append(tokens.shape[0])  # At trace time.
    return step_fn(tokens, state)

  _beam(recording_step, state, 3, 2, 4)
  assert seen[0] == 3 and set(seen[1:]) == {6}


# Decoding constraints. A stands for <unk> where a test suppresses it.
UNK = A


def _words(tokens):
  """A decoded row's words: its tokens before the EOS."""
  tokens = [int(t) for t in np.asarray(tokens)]
  return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def _has_repeated_trigram(words):
  trigrams = list(zip(words, words[1:], words[2:]))
  return len(set(trigrams)) < len(trigrams)


# <unk> is always the best word; without it, B C EOS (0.35 * 0.35 * 0.45).
_UNK_FIRST = {BOS: {UNK: 0.6, B: 0.35, EOS: 0.05},
              UNK: {UNK: 0.6, C: 0.3, EOS: 0.1},
              B: {UNK: 0.6, C: 0.35, EOS: 0.05},
              C: {UNK: 0.5, EOS: 0.45, D: 0.05}}


def test_suppress_unk_picks_the_next_best_word():
  step_fn, table = _bigram_step(_UNK_FIRST)
  calls = jnp.zeros(1, jnp.int32)
  rule = decoding.Constraints(suppress_ids=(UNK,))
  np.testing.assert_array_equal(_greedy(step_fn, calls, 1, 4).tokens[0],
                                [UNK] * 4)
  assert UNK in np.asarray(_beam(step_fn, calls, 1, 2, 4).tokens[0])
  expected = [B, C, EOS, PAD]
  for out in (_greedy(step_fn, calls, 1, 4, constraints=rule),
              _beam(step_fn, calls, 1, 2, 4, constraints=rule)):
    np.testing.assert_array_equal(out.tokens[0], expected)
    assert int(out.lengths[0]) == 2
    # The model's own log-probabilities: nothing renormalised.
    np.testing.assert_allclose(out.scores[0], _logprob(table, [B, C, EOS]),
                               rtol=1e-6)
  drawn = _sample(step_fn, jnp.zeros(256, jnp.int32), 256, 4,
                  jax.random.key(0))
  assert (np.asarray(drawn.tokens) == UNK).any()
  drawn = _sample(step_fn, jnp.zeros(256, jnp.int32), 256, 4,
                  jax.random.key(0), constraints=rule)
  assert not (np.asarray(drawn.tokens) == UNK).any()


# EOS right after the first word; the best non-EOS path is A B C.
_EARLY_EOS = {BOS: {A: 0.9, B: 0.1}, A: {EOS: 0.7, B: 0.2, C: 0.1},
              B: {EOS: 0.6, C: 0.4}, C: {EOS: 0.8, D: 0.2},
              D: {EOS: 0.5, A: 0.5}}


def test_min_length_forbids_an_early_eos():
  step_fn, table = _bigram_step(_EARLY_EOS)
  calls = jnp.zeros(1, jnp.int32)
  np.testing.assert_array_equal(_greedy(step_fn, calls, 1, 6).tokens[0],
                                [A, EOS] + [PAD] * 4)
  np.testing.assert_array_equal(_beam(step_fn, calls, 1, 2, 6).tokens[0],
                                [A, EOS] + [PAD] * 4)
  rule = decoding.Constraints(min_length=3)
  for out in (_greedy(step_fn, calls, 1, 6, constraints=rule),
              _beam(step_fn, calls, 1, 2, 6, constraints=rule)):
    np.testing.assert_array_equal(out.tokens[0], [A, B, C, EOS, PAD, PAD])
    assert int(out.lengths[0]) == 3
    np.testing.assert_allclose(out.scores[0],
                               _logprob(table, [A, B, C, EOS]), rtol=1e-6)
  batch = 256
  drawn = _sample(step_fn, jnp.zeros(batch, jnp.int32), batch, 6,
                  jax.random.key(0))
  assert (np.asarray(drawn.lengths) < 3).any()
  drawn = _sample(step_fn, jnp.zeros(batch, jnp.int32), batch, 6,
                  jax.random.key(0), constraints=rule)
  assert (np.asarray(drawn.lengths) >= 3).all()


# A B C A B C ... unless blocked; the second choices are D after A or B,
# A after D and B after C. No EOS, so every answer has L words.
_CYCLE = {BOS: {A: 1.0}, A: {B: 0.85, D: 0.15}, B: {C: 0.7, D: 0.3},
          C: {A: 0.75, B: 0.25}, D: {A: 0.6, B: 0.4}}


def test_block_trigrams_never_repeats_a_trigram():
  step_fn, table = _bigram_step(_CYCLE)
  calls = jnp.zeros(1, jnp.int32)
  length = 8
  np.testing.assert_array_equal(_greedy(step_fn, calls, 1, length).tokens[0],
                                [A, B, C, A, B, C, A, B])
  assert _has_repeated_trigram(
      _words(_beam(step_fn, calls, 1, 2, length).tokens[0]))
  rule = decoding.Constraints(block_trigrams=True)
  greedy = _greedy(step_fn, calls, 1, length, constraints=rule)
  # A B C A B, then C would repeat A B C: D; then A and B as before.
  expected = [A, B, C, A, B, D, A, B]
  np.testing.assert_array_equal(greedy.tokens[0], expected)
  np.testing.assert_allclose(greedy.scores[0], _logprob(table, expected),
                             rtol=1e-6)
  # Beam search finds the best caption without a repeated trigram (two tie:
  # A B D A B C A B uses the same transitions).
  beam = _beam(step_fn, calls, 1, 2, length, constraints=rule)
  allowed = [[A] + list(w) for w in itertools.product([A, B, C, D],
                                                      repeat=length - 1)
             if not _has_repeated_trigram([A] + list(w))]
  best = max(_logprob(table, w) for w in allowed)
  winners = [w for w in allowed if _logprob(table, w) == best]
  assert list(np.asarray(beam.tokens[0])) in winners, beam.tokens[0]
  np.testing.assert_allclose(beam.scores[0], best, rtol=1e-6)


def test_block_trigrams_on_random_tables():
  """Every decoder, every row: no trigram twice; and some would repeat one."""
  batch, length = 16, 12
  step_fn, state, _ = _trigram_step(0, batch)
  rule = decoding.Constraints(block_trigrams=True)
  rng = jax.random.key(0)
  plain = [_greedy(step_fn, state, batch, length),
           _beam(step_fn, state, batch, 3, length),
           _sample(step_fn, state, batch, length, rng)]
  for out in plain:
    assert any(_has_repeated_trigram(_words(row)) for row in out.tokens)
  for out in (_greedy(step_fn, state, batch, length, constraints=rule),
              _beam(step_fn, state, batch, 3, length, constraints=rule),
              _sample(step_fn, state, batch, length, rng, constraints=rule)):
    for row in out.tokens:
      assert not _has_repeated_trigram(_words(row)), row


def test_single_beam_equals_greedy_under_constraints():
  batch, length = 8, 10
  step_fn, state, _ = _trigram_step(3, batch)
  rule = decoding.Constraints(suppress_ids=(A,), min_length=4,
                              block_trigrams=True)
  greedy = _greedy(step_fn, state, batch, length, constraints=rule)
  beam = _beam(step_fn, state, batch, 1, length, constraints=rule)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-6)
  tokens = np.asarray(greedy.tokens)
  assert not (tokens == A).any()
  assert (np.asarray(greedy.lengths) >= 4).all()
  assert not any(_has_repeated_trigram(_words(row)) for row in tokens)
  # The rules changed some answers.
  assert (tokens != np.asarray(_greedy(step_fn, state, batch,
                                       length).tokens)).any()


def test_a_row_with_every_word_forbidden_keeps_the_models_choice():
  # Only EOS is possible after BOS, and min_length forbids it.
  step_fn, _ = _bigram_step({BOS: {EOS: 1.0}})
  rule = decoding.Constraints(min_length=2)
  out = _greedy(step_fn, jnp.zeros(1, jnp.int32), 1, 3, constraints=rule)
  np.testing.assert_array_equal(out.tokens[0], [EOS, PAD, PAD])
  assert float(out.scores[0]) == 0.0


def test_default_constraints_are_todays_decoders():
  # Equal and hashable however built, so a jit cache key.
  plain = decoding.Constraints(suppress_ids=[], min_length=0)
  assert plain == decoding.Constraints() and not plain.active
  assert hash(plain) == hash(decoding.Constraints())
  assert decoding.Constraints(suppress_ids=[3]).suppress_ids == (3,)
  with pytest.raises(ValueError, match="min_length"):
    decoding.Constraints(min_length=-1)
  step_fn, state, _ = _trigram_step(2, 3)
  for search in (decoding.greedy, decoding.beam_search):
    extra = dict(beam_size=2) if search is decoding.beam_search else {}
    fn = functools.partial(search, step_fn, batch_size=3, max_length=6,
                           bos_id=BOS, eos_id=EOS, **extra)
    # The very same program as without the argument.
    assert (str(jax.make_jaxpr(fn)(state)) ==
            str(jax.make_jaxpr(functools.partial(fn, constraints=plain))(
                state)))
  # And the saved answers.
  (seed, batch, beams, length, penalty), _, tokens, lengths, scores = (
      _BEAM_REFERENCE[2])
  step_fn, state, _ = _trigram_step(seed, batch)
  out = _beam(step_fn, state, batch, beams, length, length_penalty=penalty,
              constraints=plain)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.lengths, lengths)
  np.testing.assert_allclose(out.scores, np.float32(scores), rtol=1e-6)
