"""Model-agnostic decoding over a step function.

A step function has the signature

  step_fn(tokens [N], state) -> (logits [N, V], state, alpha [N, R])

where `state` is any pytree carried between steps, every leaf with leading
dim N, and `alpha` is the attention map that produced the word (any fixed
trailing shape works). N is the batch B, or B*K for the K beams of a beam
search, so a step function must work row by row for any N.

Three decoders share it: `greedy`, `beam_search` and `sample`. All of them
compile with static sizes (wrap them in `jax.jit` with `functools.partial`).
All of them take `Constraints`, rules on which words may be picked.
"""

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any, jax.Array]]


@flax.struct.dataclass
class Decoded:
  """What a decoder returns for a batch.

  Every decoder zeros `alphas` after the EOS (and `tokens` hold PAD there),
  so a caption's attention maps are exactly those of its emitted tokens.
  """
  tokens: jax.Array  # [B, L] int32, PAD after EOS
  scores: jax.Array  # [B] log-prob sum of the words (beam: normalised)
  lengths: jax.Array  # [B] int32, words before EOS
  alphas: jax.Array  # [B, L, *R] attention map of each token, 0 after EOS


@dataclasses.dataclass(frozen=True)
class Constraints:
  """Rules on the words a decoder may pick, applied at every step.

  Frozen and hashable, so it can be a static argument of `jax.jit` or
  `jax.pmap` (or be closed over with `functools.partial`): each setting
  compiles its own program, and the default, no rule, compiles exactly the
  unconstrained decoder.

  A forbidden word gets a log-probability of -inf before the choice. Nothing
  is renormalised: scores stay the model's log-probabilities of the chosen
  words, so they compare with unconstrained ones. A row where the rules
  leave no word the model deems possible keeps its unconstrained
  log-probabilities, so a decoder never has to choose among -inf alone.
  """
  suppress_ids: tuple[int, ...] = ()  # Words never emitted (e.g. <unk>).
  min_length: int = 0  # EOS is forbidden before this many words; 0: none.
  # No trigram twice within one hypothesis: a word that would complete a
  # trigram the hypothesis already holds is forbidden. self-critical.pytorch's
  # block_trigrams subtracts 2 ln 2 per earlier occurrence and notes that a
  # larger weight works best; this is the limit of an infinite weight.
  block_trigrams: bool = False

  def __post_init__(self):
    # A list would make the instance unhashable, so unusable as a static
    # argument.
    object.__setattr__(self, "suppress_ids",
                       tuple(int(i) for i in self.suppress_ids))
    if isinstance(self.min_length, bool) or self.min_length < 0:
      raise ValueError(
          f"min_length must be a whole number >= 0, got {self.min_length!r}.")

  @property
  def active(self) -> bool:
    """Whether any rule is on (if not, decoders skip the masking)."""
    return bool(self.suppress_ids or self.min_length > 0 or
                self.block_trigrams)


def _repeated_trigram_words(history: jax.Array, step: jax.Array,
                            vocab_size: int) -> jax.Array:
  """The words that would repeat a trigram of their row's history.

  Args:
    history: [N, L] int, the words of each row at positions 0..step-1 (what
      follows is ignored).
    step: [] int, the position of the next word.
    vocab_size: V.

  Returns:
    [N, V] bool, True for w where (history[step-2], history[step-1], w)
    already occurs at some positions (j, j+1, j+2), j + 2 < step.
  """
  n, length = history.shape
  if length < 3:
    return jnp.zeros((n, vocab_size), bool)
  # The last two words; clamped indices only matter before step 2, where
  # no j is valid.
  last_two = jax.lax.dynamic_slice_in_dim(
      history, jnp.maximum(step - 2, 0), 2, axis=1)  # [N, 2]
  j = jnp.arange(length - 2)
  same_prefix = ((history[:, :-2] == last_two[:, :1]) &
                 (history[:, 1:-1] == last_two[:, 1:]) &
                 (j + 2 < step))  # [N, L-2]
  # A scatter of the L-2 candidate words costs less than comparing [N, L, V];
  # words of no matching prefix go out of range and are dropped.
  words = jnp.where(same_prefix, history[:, 2:], vocab_size)  # [N, L-2]
  return jnp.zeros((n, vocab_size), bool).at[
      jnp.arange(n)[:, None], words].set(True, mode="drop")


def _forbidden(constraints: Constraints, step: jax.Array,
               history: jax.Array | None, vocab_size: int, eos_id: int,
               rows: int) -> jax.Array:
  """Which words `constraints` forbid at `step`: [rows, V] bool.

  Args:
    constraints: the rules.
    step: [] int, words generated so far.
    history: [rows, L] int, the words so far; needed with block_trigrams.
    vocab_size: V.
    eos_id: end token.
    rows: N.

  Returns:
    [N, V] bool, True for a forbidden word.
  """
  columns = jnp.zeros((vocab_size,), bool)  # [V], the same for every row
  if constraints.suppress_ids:
    columns = columns.at[jnp.array(constraints.suppress_ids)].set(True)
  if constraints.min_length > 0:
    columns = columns.at[eos_id].set(columns[eos_id] |
                                     (step < constraints.min_length))
  forbidden = jnp.broadcast_to(columns, (rows, vocab_size))
  if constraints.block_trigrams:
    forbidden = forbidden | _repeated_trigram_words(history, step, vocab_size)
  return forbidden


def _mask(x: jax.Array, forbidden: jax.Array) -> jax.Array:
  """-inf at the forbidden words of [N, V] logits or log-probabilities.

  A row left with -inf alone keeps its values (see `Constraints`).
  """
  masked = jnp.where(forbidden, -jnp.inf, x)
  stuck = jnp.isneginf(masked).all(-1, keepdims=True)  # [N, 1]
  return jnp.where(stuck, x, masked)


# Picks the next word from a step's float32 logits [B, V], their
# log-probabilities [B, V] and the step index []: [B] int.
_ChooseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _decode_one_path(step_fn: StepFn, state: Any, batch_size: int,
                     max_length: int, choose: _ChooseFn, *, bos_id: int,
                     eos_id: int, pad_id: int,
                     constraints: Constraints = Constraints()) -> Decoded:
  """The scan shared by `greedy` and `sample`: one path per image.

  Args:
    step_fn: the step function.
    state: initial decoder state.
    batch_size: B.
    max_length: L, number of generated tokens (EOS included).
    choose: picks each step's word (argmax, or a draw).
    bos_id: first input token.
    eos_id: end token; later positions become `pad_id`.
    pad_id: filler after EOS.
    constraints: words `choose` never sees as possible.

  Returns:
    A `Decoded`; scores sum the model's log-probabilities of the chosen words.
  """

  def body(carry, t):
    tokens, state, done, score, history = carry
    logits, state, alpha = step_fn(tokens, state)
    logits = logits.astype(jnp.float32)  # [B, V]
    logprobs = jax.nn.log_softmax(logits)
    if constraints.active:
      forbidden = _forbidden(constraints, t, history, logits.shape[-1],
                             eos_id, batch_size)  # [B, V]
      word = choose(_mask(logits, forbidden), _mask(logprobs, forbidden), t)
    else:
      word = choose(logits, logprobs, t)  # [B]
    score = score + jnp.where(
        done, 0.0, jnp.take_along_axis(logprobs, word[:, None], -1)[:, 0])
    word = jnp.where(done, pad_id, word).astype(jnp.int32)
    # `done` is still the state before this word, so the EOS keeps its map.
    alpha = jnp.where(done.reshape((-1,) + (1,) * (alpha.ndim - 1)),
                      jnp.zeros_like(alpha), alpha)
    emitted = ~done
    done = done | (word == eos_id)
    if history is not None:
      history = history.at[:, t].set(word)
    return (word, state, done, score, history), (word, alpha,
                                                 emitted & (word != eos_id))

  # The words so far, carried only for the trigram rule; None adds nothing
  # to the scan.
  history = (jnp.full((batch_size, max_length), pad_id, jnp.int32)
             if constraints.block_trigrams else None)  # [B, L]
  init = (jnp.full((batch_size,), bos_id, jnp.int32), state,
          jnp.zeros((batch_size,), bool), jnp.zeros((batch_size,)), history)
  (_, _, _, score, _), (tokens, alphas, is_word) = jax.lax.scan(
      body, init, jnp.arange(max_length))
  # Time-major back to batch-major: [L, B, ...] -> [B, L, ...].
  return Decoded(tokens=tokens.T, scores=score,
                 lengths=is_word.sum(0).astype(jnp.int32),
                 alphas=alphas.swapaxes(0, 1))


def greedy(step_fn: StepFn, state: Any, batch_size: int, max_length: int, *,
           bos_id: int, eos_id: int, pad_id: int = 0,
           constraints: Constraints = Constraints()) -> Decoded:
  """Picks the most likely allowed word at every step, for `max_length` steps.

  Args:
    step_fn: the step function.
    state: initial decoder state.
    batch_size: B.
    max_length: L, number of generated tokens (EOS included).
    bos_id: first input token.
    eos_id: end token; later positions become `pad_id`.
    pad_id: filler after EOS.
    constraints: words never picked; default none.

  Returns:
    A `Decoded`; alphas are zeros after EOS.
  """
  # The argmax of the log-probabilities, not of the logits: subtracting the
  # log-normaliser can round two logits to a tie, which then goes to the
  # lower index.
  return _decode_one_path(
      step_fn, state, batch_size, max_length,
      lambda logits, logprobs, t: logprobs.argmax(-1),
      bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, constraints=constraints)


def _length_penalty(length: jax.Array | int, exponent: float) -> jax.Array:
  """GNMT length penalty ((5 + length) / 6) ** exponent; exactly 1 at 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** exponent


def _gather_beams(tree: Any, beam_idx: jax.Array) -> Any:
  """Picks beams per image in every leaf of `tree`.

  Args:
    tree: a pytree (a `Hypotheses`, an array...) of [B, K_old, ...] leaves.
    beam_idx: [B, K_new] int, the old beam of each new one.

  Returns:
    The same pytree with [B, K_new, ...] leaves.
  """
  return jax.tree.map(
      lambda x: jax.vmap(lambda xb, ib: xb[ib])(x, beam_idx), tree)


def _flat_to_beams(x: jax.Array, batch_size: int) -> jax.Array:
  return x.reshape((batch_size, -1) + x.shape[1:])  # [B*K, ...] -> [B, K, ...]


def _beams_to_flat(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])  # [B, K, ...] -> [B*K, ...]


def _lax_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over the last axis, or a stable sort where it must.

  A program exported with a symbolic batch (`tools/export.py`) must also run
  in TensorFlow's XlaCallModule, whose shape refinement cannot see into the
  decomposition that `chlo.top_k` is serialized with. There a sort of the
  negated values, stable so ties keep the lower index first, picks the same
  values and indices as `lax.top_k`.
  """
  if all(isinstance(d, int) for d in x.shape):
    return jax.lax.top_k(x, k)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  negated, index = jax.lax.sort((-x, index), dimension=x.ndim - 1,
                                num_keys=1, is_stable=True)
  return -negated[..., :k], index[..., :k]


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over the last axis of [N, V], in two cheap passes.

  The V entries are cut into blocks of about sqrt(V / k). The best k entries
  lie in the k blocks with the largest maxima (a block without one of them
  has a maximum below the k-th best), so only those k blocks are searched.
  Taking the blocks in index order keeps top_k's rule that ties go to the
  lower index, so values and indices equal `jax.lax.top_k`'s. On a CPU this
  is faster at a COCO-sized V, where `lax.top_k`'s one full pass would
  dominate a beam search step (benchmarks/README.md).

  Args:
    x: [N, V] scores.
    k: entries to keep per row, at most V.

  Returns:
    (values [N, k], indices [N, k]), best first.
  """
  n, v = x.shape
  # nb blocks, then k blocks of `block` entries: least work near sqrt(V/k);
  # a block size that divides V spares a padded copy of the scores.
  target = max(math.isqrt(v // max(k, 1)), 1)
  divisors = [d for d in range(max(target // 2, 1), 2 * target + 1)
              if v % d == 0]
  block = min(divisors, key=lambda d: abs(d - target), default=target)
  num_blocks = -(-v // block)
  if k * block * 2 > v:  # Too few blocks to skip: one pass is as cheap.
    return _lax_top_k(x, k)
  # -inf padding sits at the end, so ties never pick it over a real entry.
  blocks = jnp.pad(x, ((0, 0), (0, num_blocks * block - v)),
                   constant_values=-jnp.inf).reshape(n, num_blocks, block)
  _, best_blocks = _lax_top_k(blocks.max(-1), k)  # [N, nb] -> [N, k]
  best_blocks = jnp.sort(best_blocks, axis=-1)
  candidates = jnp.take_along_axis(blocks, best_blocks[:, :, None], 1)
  values, pos = _lax_top_k(candidates.reshape(n, k * block), k)
  blocks_of = jnp.take_along_axis(best_blocks, pos // block, 1)  # [N, k]
  return values, blocks_of * block + pos % block


@flax.struct.dataclass
class Hypotheses:
  """K hypotheses per image, best first: the live set or the finished set.

  Live hypotheses have `scores` that are raw log-prob sums, `lengths` equal
  to the words so far (the step), PAD tokens and zero alphas from the step
  on. Finished hypotheses have length-normalised scores (see
  `beam_search_loop`), `lengths` counting the words before the EOS, PAD
  tokens and zero alphas after it. A score of -inf marks an empty slot,
  whose other fields mean nothing.
  """
  tokens: jax.Array  # [B, K, L] int32
  scores: jax.Array  # [B, K] float32, -inf for an empty slot
  lengths: jax.Array  # [B, K] int32, words (EOS not counted)
  alphas: jax.Array  # [B, K, L, *R] the step function's alpha per token


@flax.struct.dataclass
class BeamState:
  """The carry of the beam-search loop.

  B images, K beams per image, L = max_length, R the trailing shape of the
  step function's alpha.
  """
  step: jax.Array  # [] int32, tokens generated so far
  last_tokens: jax.Array  # [B, K] int32, input of the next step
  live: Hypotheses  # raw scores; empty beams at -inf
  finished: Hypotheses  # normalised scores; free slots at -inf
  cache: Any  # step-function state, every leaf [B*K, ...]
  done: jax.Array  # [B] bool, no live beam can enter the finished set


def _init_hypotheses(b: int, k: int, l: int, alpha_tail: tuple[int, ...],
                     dtype: Any, pad_id: int) -> Hypotheses:
  """K empty slots per image: PAD tokens, -inf scores, zero alphas."""
  return Hypotheses(
      tokens=jnp.full((b, k, l), pad_id, jnp.int32),
      scores=jnp.full((b, k), -jnp.inf),
      lengths=jnp.zeros((b, k), jnp.int32),
      alphas=jnp.zeros((b, k, l) + tuple(alpha_tail), dtype))


def _best_candidates(live_scores: jax.Array, logits: jax.Array,
                     forbidden: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ranks every extension of every live beam; keeps the best 2K per image.

  Args:
    live_scores: [B, K] raw log-prob sums of the live beams.
    logits: [B*K, V] the step's logits, row b * K + k for beam k of image b.
    forbidden: [B*K, V] bool, extensions scored -inf (see `Constraints`);
      None forbids none.

  Returns:
    (scores [B, C] raw log-prob sums, best first; parent [B, C] live beam
    extended; word [B, C] int32 word added), C = min(2K, K * V).
  """
  b, k = live_scores.shape
  vocab_size = logits.shape[-1]
  num_words = min(2 * k, vocab_size)  # Per beam: enough for 2K per image.
  logits = logits.astype(jnp.float32)  # [B*K, V]
  # A beam's best 2K words hold all of its candidates that can make its
  # image's best 2K, so only they are normalised (as log_softmax does it)
  # and ranked.
  ranked = logits if forbidden is None else _mask(logits, forbidden)
  word_logits, words = top_k(ranked, num_words)  # [B*K, V] -> [B*K, 2K]
  # The normaliser is the model's over every word, so a forbidden word's
  # mass is not handed to the others.
  shift = logits.max(-1, keepdims=True)
  logprobs = (word_logits - shift) - jnp.log(
      jnp.exp(logits - shift).sum(-1, keepdims=True))
  scores = live_scores[:, :, None] + _flat_to_beams(logprobs, b)  # [B, K, 2K]
  top_scores, top_idx = _lax_top_k(scores.reshape(b, k * num_words),
                                      min(2 * k, k * vocab_size))  # [B, C]
  word = jnp.take_along_axis(words.reshape(b, k * num_words), top_idx, 1)
  return top_scores, top_idx // num_words, word.astype(jnp.int32)


def _grow(live: Hypotheses, parent: jax.Array, scores: jax.Array,
          word: jax.Array, alpha: jax.Array, step: jax.Array) -> Hypotheses:
  """The candidates: their parents' histories with this step's word added.

  Args:
    live: the live set.
    parent: [B, C] live beam each candidate extends.
    scores: [B, C] raw log-prob sums of the candidates.
    word: [B, C] int32 word each candidate adds.
    alpha: [B, K, *R] this step's alpha of every live beam.
    step: [] int32 position of the new word.

  Returns:
    C candidates per image, shaped as live hypotheses of `step + 1` words.
  """
  grown, alpha = _gather_beams((live, alpha), parent)
  return grown.replace(tokens=grown.tokens.at[:, :, step].set(word),
                       scores=scores,
                       lengths=grown.lengths + 1,
                       alphas=grown.alphas.at[:, :, step].set(alpha))


def _merge_finished(finished: Hypotheses, candidates: Hypotheses,
                    ends: jax.Array, step: jax.Array, length_penalty: float,
                    frozen: jax.Array) -> Hypotheses:
  """Moves the candidates that end into the finished set; keeps the best K.

  Args:
    finished: the finished set.
    candidates: this step's candidates from `_grow`, [B, C, ...].
    ends: [B, C] bool, candidates whose word (at `step`) is an EOS that ends.
    step: [] int32, position of that EOS.
    length_penalty: GNMT exponent.
    frozen: [B] bool, images whose finished set stays as it is.

  Returns:
    The new finished set.
  """
  k = finished.scores.shape[1]
  # The EOS counts in the length penalty but is not a word.
  ending = candidates.replace(
      scores=jnp.where(ends, candidates.scores / _length_penalty(
          step + 1, length_penalty), -jnp.inf),
      lengths=candidates.lengths - 1)
  # Old first so that top_k's ties keep them.
  merged = jax.tree.map(lambda old, new: jnp.concatenate([old, new], 1),
                        finished, ending)  # [B, K + C, ...]
  _, best = _lax_top_k(merged.scores, k)  # [B, K + C] -> [B, K]
  merged = _gather_beams(merged, best)
  # A done image keeps its finished set as it is, so its answer does not
  # depend on how long the other images in the batch keep searching.
  return jax.tree.map(
      lambda old, new: jnp.where(
          frozen.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
      finished, merged)


def _select_live(candidates: Hypotheses, is_eos: jax.Array, k: int
                 ) -> tuple[Hypotheses, jax.Array]:
  """The best K candidates that did not end: (live set, indices [B, K])."""
  scores, idx = _lax_top_k(jnp.where(is_eos, -jnp.inf, candidates.scores),
                              k)  # [B, C] -> [B, K]
  # The masked scores, not the gathered ones: with fewer than K words that
  # are not EOS, an EOS candidate fills a slot and must stay empty.
  return _gather_beams(candidates, idx).replace(scores=scores), idx


def _best_reachable(live_scores: jax.Array, step: jax.Array, max_length: int,
                    length_penalty: float) -> jax.Array:
  """Bounds the normalised score any live beam can still end with: [B].

  A live beam can still end with any length from step + 1 to L. Dividing
  its raw score (<= 0, and only falling) by the largest penalty over that
  range bounds every normalised score it can reach; the penalty is
  monotone in length, so the largest sits at one end.
  """
  worst_penalty = jnp.maximum(_length_penalty(step + 1, length_penalty),
                              _length_penalty(max_length, length_penalty))
  return live_scores.max(-1) / worst_penalty  # [B, K] -> [B]


def beam_search_loop(step_fn: StepFn, state: Any, batch_size: int,
                     beam_size: int, max_length: int, *, bos_id: int,
                     eos_id: int, pad_id: int = 0,
                     length_penalty: float = 0.0,
                     constraints: Constraints = Constraints()) -> BeamState:
  """Runs the beam search and returns its final `BeamState`.

  `beam_search` reads the answer out of this state; the state itself is
  public so that tests and diagnostics can see how many steps ran and what
  the step function carried.

  Every step extends the K live beams of an image by every word, ranks the
  K * V candidates by raw log-prob sum and keeps the best 2K. The EOS
  candidates among the best K of them end: they move to the finished set,
  which keeps the K best by length-normalised score. The best K candidates
  that did not end become the new live beams (2K always holds K of them, as
  each parent has one EOS candidate). Only EOS candidates inside the top K
  may end so that a single beam reproduces greedy decoding exactly.

  Args:
    step_fn: the step function; it is called once with [B] tokens (the
      first step, where every beam of an image is the same), then with
      [B*K] tokens, row b * K + k being beam k of image b.
    state: initial decoder state, every leaf with leading dim B.
    batch_size: B.
    beam_size: K.
    max_length: L, most generated tokens (EOS included).
    bos_id: first input token.
    eos_id: end token.
    pad_id: filler after EOS.
    length_penalty: GNMT exponent; finished scores are log-prob sums divided
      by ((5 + tokens) / 6) ** length_penalty. 0 keeps raw sums.
    constraints: extensions never made, each beam's own words being its
      history; default none.

  Returns:
    The final `BeamState`.

  Raises:
    ValueError: if `beam_size` or `max_length` is below 1.
  """
  if beam_size < 1 or max_length < 1:
    raise ValueError(f"beam_size and max_length must be at least 1, got "
                     f"{beam_size} and {max_length}.")
  b, k, l = batch_size, beam_size, max_length
  # Step 0: the K beams of an image would all be the same (BOS and the
  # initial state), so the step runs on one row per image.
  logits, cache, alpha = step_fn(jnp.full((b,), bos_id, jnp.int32), state)

  def expand(s: BeamState, logits, cache, alpha) -> BeamState:
    """Extends every live beam by the step's words: [B*K] rows in."""
    t = s.step
    forbidden = None
    if constraints.active:  # Every live beam holds t words.
      forbidden = _forbidden(constraints, t, _beams_to_flat(s.live.tokens),
                             logits.shape[-1], eos_id,
                             logits.shape[0])  # [B*K, V]
    scores, parent, word = _best_candidates(s.live.scores, logits,
                                            forbidden)  # [B, 2K]
    candidates = _grow(s.live, parent, scores, word, _flat_to_beams(alpha, b),
                       t)
    is_eos = word == eos_id
    ends = is_eos & (jnp.arange(scores.shape[1]) < k) & (scores > -jnp.inf)
    finished = _merge_finished(s.finished, candidates, ends, t,
                               length_penalty, s.done)
    live, idx = _select_live(candidates, is_eos, k)
    live_parent = jnp.take_along_axis(parent, idx, 1)  # [B, K]
    cache = jax.tree.map(
        lambda x: _beams_to_flat(_gather_beams(_flat_to_beams(x, b),
                                               live_parent)), cache)
    # The finished set is full (a free slot is -inf) and no live beam can
    # beat its worst member: nothing can change this image's answer.
    done = s.done | (_best_reachable(live.scores, t + 1, l, length_penalty)
                     <= finished.scores.min(-1))
    return BeamState(step=t + 1, last_tokens=live.tokens[:, :, t], live=live,
                     finished=finished, cache=cache, done=done)

  def cond(s: BeamState):
    return (s.step < l) & ~s.done.all()

  def body(s: BeamState) -> BeamState:
    return expand(s, *step_fn(s.last_tokens.reshape(-1), s.cache))

  empty = _init_hypotheses(b, k, l, alpha.shape[1:], alpha.dtype, pad_id)
  init = BeamState(
      step=jnp.array(0, jnp.int32),
      last_tokens=jnp.full((b, k), bos_id, jnp.int32),
      # Only beam 0 is live at the start; the others would copy it.
      live=empty.replace(scores=empty.scores.at[:, 0].set(0.0)),
      finished=empty,
      cache=None,  # Set by the first expansion.
      done=jnp.zeros((b,), bool))

  def tile(x):  # Beam-major, [B, ...] -> [B*K, ...]: row b * K + k.
    return jnp.repeat(x, k, axis=0)

  first = expand(init, tile(logits), jax.tree.map(tile, cache), tile(alpha))
  return jax.lax.while_loop(cond, body, first)


def beam_search(step_fn: StepFn, state: Any, batch_size: int, beam_size: int,
                max_length: int, *, bos_id: int, eos_id: int, pad_id: int = 0,
                length_penalty: float = 0.0,
                constraints: Constraints = Constraints()) -> Decoded:
  """Batched beam search; returns the best hypothesis of every image.

  The search stops early once, for every image, the K finished slots are
  full and no live beam can beat the worst of them (see `beam_search_loop`
  for the bound). An image with no finished hypothesis after `max_length`
  steps falls back to its best live beam, normalised as a `max_length`-token
  hypothesis. With `beam_size=1` and `length_penalty=0` this gives exactly
  `greedy`'s tokens, lengths and scores; with a positive length penalty a
  single beam may go on past greedy's EOS to a better-normalised ending.

  Args:
    step_fn: the step function, called as in `beam_search_loop`.
    state: initial decoder state, every leaf with leading dim B.
    batch_size: B.
    beam_size: K.
    max_length: L, most generated tokens (EOS included).
    bos_id: first input token.
    eos_id: end token; later positions become `pad_id`.
    pad_id: filler after EOS.
    length_penalty: GNMT exponent; scores are log-prob sums divided by
      ((5 + tokens) / 6) ** length_penalty, tokens counting the EOS.
    constraints: extensions never made; default none.

  Returns:
    A `Decoded`: tokens [B, L] with EOS where the caption ended and PAD after,
    the length-normalised scores [B], lengths [B] (words before EOS) and the
    chosen beam's alphas [B, L, *R] (zeros after EOS).
  """
  s = beam_search_loop(step_fn, state, batch_size, beam_size, max_length,
                       bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                       length_penalty=length_penalty, constraints=constraints)
  has_finished = s.finished.scores[:, 0] > -jnp.inf  # [B]
  # Best finished hypothesis, else best live one (its length is the step).
  best = jax.tree.map(
      lambda fin, live: jnp.where(
          has_finished.reshape((-1,) + (1,) * (fin.ndim - 2)),
          fin[:, 0], live[:, 0]), s.finished, s.live)
  fallback_score = s.live.scores[:, 0] / _length_penalty(s.step,
                                                         length_penalty)
  return Decoded(tokens=best.tokens,
                 scores=jnp.where(has_finished, best.scores, fallback_score),
                 lengths=best.lengths, alphas=best.alphas)


def _filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets to -inf the logits outside the top-k and the top-p nucleus.

  Ties with the last kept logit are kept, so a filter may keep a few more
  words than asked for.

  Args:
    logits: [B, V], already divided by the temperature.
    top_k: keep the k most likely words; 0 keeps all.
    top_p: keep the fewest most likely words whose mass reaches top_p (the
      most likely word always stays); 1.0 keeps all.

  Returns:
    The filtered [B, V] logits.
  """
  vocab_size = logits.shape[-1]
  if 0 < top_k < vocab_size:
    kth = _lax_top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)  # [B, V], most likely first
    probs = jax.nn.softmax(desc, axis=-1)
    # A word stays if the words above it have not yet reached top_p.
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.where(mass_above < top_p, desc, jnp.inf).min(
        -1, keepdims=True)  # [B, 1]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(step_fn: StepFn, state: Any, batch_size: int, max_length: int,
           rng: jax.Array, *, bos_id: int, eos_id: int, pad_id: int = 0,
           temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0,
           constraints: Constraints = Constraints()) -> Decoded:
  """Ancestral sampling with temperature, top-k and nucleus (top-p) filters.

  Step t draws with the key `jax.random.fold_in(rng, t)`. The scores are the
  log-probabilities of the drawn words under the model's own distribution
  (temperature 1, no filter), so they compare directly with `greedy` and
  `beam_search` scores and can rerank samples. `temperature`, `top_k` and
  `top_p` are Python numbers (static under `jax.jit`).

  Args:
    step_fn: the step function.
    state: initial decoder state.
    batch_size: B.
    max_length: L, number of generated tokens (EOS included).
    rng: a PRNG key.
    bos_id: first input token.
    eos_id: end token; later positions become `pad_id`.
    pad_id: filler after EOS.
    temperature: logits are divided by it before sampling; must be > 0.
    top_k: sample only among the k most likely words; 0 turns it off.
    top_p: sample only among the fewest most likely words whose probability
      reaches top_p; 1.0 turns it off.
    constraints: words never drawn, taken out before the filters; default
      none.

  Returns:
    A `Decoded`; alphas are zeros after EOS.

  Raises:
    ValueError: if temperature, top_k or top_p is out of range.
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}; use "
                     "greedy() for the most likely words.")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}.")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}.")

  def draw(logits, logprobs, t):
    del logprobs  # The filters work on the tempered logits.
    filtered = _filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), filtered)

  return _decode_one_path(step_fn, state, batch_size, max_length, draw,
                          bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                          constraints=constraints)
