"""CIDEr-D in numpy, fast enough to reward self-critical training samples.

The math is exactly coco-caption's (pycocoevalcap `CiderScorer`, the metric
its `Cider` class reports, i.e. CIDEr-D): for n = 1..4 each caption is a
vector of tf-idf weights `tf * (log(num_images) - log(max(1, df)))`, a
candidate's weights are clipped to the reference's (`min(hyp, ref) * ref`),
the cosine similarity is multiplied by a Gaussian length penalty
(sigma = 6), averaged over the references and over n, and scaled by 10.

What differs is where the document frequencies come from and how the work
is done:

- `DocumentFrequencies` is built once, from the training references, and
  saved with the run, so every batch is scored with the same idf. (coco's
  `Cider.compute_score` builds it from the scored set itself; build it from
  those references to reproduce its numbers.)
- Tokens are scored as given, either vocabulary ids (ints) or words (str).
  pycocoevalcap's PTB tokenizer is *not* applied: the caller tokenises.
- Every n-gram of up to 4 tokens is packed into one uint64 (16 bits a
  token), so a batch is a few sorts and searches in numpy rather than
  Python dictionaries; `CiderD.prepare` computes the references' weights
  and norms once for the K samples of each image.

Usage:

  df = cider.DocumentFrequencies.build(train_references)  # Once per run.
  df.save(os.path.join(workdir, "cider_df.npz"))
  scorer = cider.CiderD(df)
  rewards = scorer.score(samples, batch_references,
                         image_index=np.repeat(np.arange(b), k))
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from typing import Any, Sequence

from etils import epath
import numpy as np

# N-gram orders 1..MAX_N, as in coco-caption.
MAX_N = 4
# Standard deviation of the Gaussian length penalty (coco-caption's sigma).
SIGMA = 6.0
# Bits per token in a packed n-gram key: MAX_N * _BITS must fit in 64.
_BITS = 16
# A token is stored as id + 1 so that 0 marks "no token" in a key, which
# keeps keys of different orders apart; ids go up to _MAX_ID.
_MAX_ID = (1 << _BITS) - 2
_FORMAT = "visionspeak_jax.evaluation.cider.DocumentFrequencies"

Token = int | str
TokenSequences = Sequence[Sequence[Token]]


def _orders(keys: np.ndarray) -> np.ndarray:
  """n - 1 of each packed key: how many 16-bit groups above the lowest."""
  out = np.zeros(keys.shape, np.int64)
  for n in range(1, MAX_N):
    out += keys >= np.uint64(1 << (_BITS * n))
  return out


def _ngram_keys(codes: np.ndarray, lengths: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Every n-gram occurrence (n = 1..4) of concatenated sentences.

  Args:
    codes: uint64 [total], token id + 1 of all sentences, one after another.
    lengths: int64 [sentences], their lengths (summing to total).

  Returns:
    (sentence index int64 [m], packed key uint64 [m]) of the m n-grams.
  """
  sentence = np.repeat(np.arange(lengths.size), lengths)
  starts = np.cumsum(lengths) - lengths
  # Tokens from each position to the end of its sentence: an n-gram starts
  # at a position when at least n are left.
  left = lengths[sentence] - (np.arange(codes.size) - starts[sentence])
  sentences, keys = [], []
  key = codes
  for n in range(1, MAX_N + 1):
    if n > 1:
      key = (key[:-1] << np.uint64(_BITS)) | codes[n - 1:]
    valid = left[:key.size] >= n
    sentences.append(sentence[:key.size][valid])
    keys.append(key[valid])
  return np.concatenate(sentences), np.concatenate(keys)


def _term_frequencies(sentence: np.ndarray, keys: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                 np.ndarray]:
  """Distinct n-grams and their count in each sentence.

  Returns:
    (unique keys uint64 [u], sentence int64 [e], index into the unique keys
    int64 [e], term frequency int64 [e]) of the e distinct (sentence, n-gram)
    pairs, sorted by sentence.
  """
  unique, inverse = np.unique(keys, return_inverse=True)
  # Keys use all 64 bits; their rank among the unique keys leaves room for
  # the sentence in one int64, so one more sort counts the pairs.
  pairs, tf = np.unique(sentence * unique.size + inverse.reshape(-1),
                        return_counts=True)
  return unique, pairs // unique.size, pairs % unique.size, tf


def _bigram_lengths(lengths: np.ndarray) -> np.ndarray:
  """coco-caption's caption "length": its number of bigrams.

  `CiderScorer.counts2vec` adds up the term frequencies of n-gram index 1,
  i.e. of the bigrams: len - 1 words (0 for an empty caption). The length
  penalty only matters between two non-empty captions (a score with an
  empty side is 0), where the difference is the same as of word counts.
  """
  return np.maximum(lengths - 1, 0)


class DocumentFrequencies:
  """In how many images' references each n-gram (n = 1..4) occurs.

  An n-gram counts once per image however often its references use it, as
  in coco-caption's `CiderScorer.compute_doc_freq`. `num_images` gives the
  idf's `log(num_images)` (coco's `ref_len`).

  Attributes:
    num_images: number of images the references came from.
    words: the token strings, id -> word, when built from words; None when
      built from integer ids (vocabulary ids).
  """

  def __init__(self, keys: np.ndarray, counts: np.ndarray, num_images: int,
               words: Sequence[str] | None = None):
    """Wraps packed statistics; use `build` or `load` to make one.

    Args:
      keys: uint64 [m], sorted distinct packed n-grams.
      counts: [m] their document frequencies.
      num_images: number of images counted.
      words: id -> word for string tokens, None for integer tokens.
    """
    if num_images < 1:
      raise ValueError("Document frequencies need at least one image, got "
                       f"num_images={num_images}.")
    self.keys = np.asarray(keys, np.uint64)
    self.counts = np.asarray(counts, np.int64)
    self.num_images = int(num_images)
    self.words = None if words is None else tuple(words)
    self._word_ids = (None if words is None else
                      {w: i for i, w in enumerate(self.words)})
    # log(max(1, df)) is 0 for df <= 1, as for an unseen n-gram, so `idf`
    # only needs the n-grams seen in two images or more: on COCO-sized
    # captions a small share of them, and a much shorter search.
    frequent = self.counts >= 2
    self._frequent_keys = self.keys[frequent]
    self._log_df = np.log(self.counts[frequent].astype(np.float64))

  def __len__(self) -> int:
    return int(self.keys.size)

  @property
  def ref_len(self) -> float:
    """log(num_images), coco-caption's `ref_len`."""
    return float(np.log(float(self.num_images)))

  @classmethod
  def build(cls, references: Sequence[TokenSequences]
            ) -> DocumentFrequencies:
    """Counts the n-grams of each image's references.

    Args:
      references: one entry per image: its reference captions, each a
        sequence of tokens, all ints (vocabulary ids, 0..65534) or all str
        (words; at most 65535 distinct).

    Returns:
      The document frequencies.
    """
    if not references:
      raise ValueError("Document frequencies need at least one image.")
    sentences = [ref for refs in references for ref in refs]
    token = _first_token(sentences)
    words = None
    if isinstance(token, str):
      # Sorted, so the same references give the same file in any order.
      words = sorted({w for s in sentences for w in s})
      if len(words) > _MAX_ID + 1:
        raise ValueError(f"{len(words)} distinct words; CIDEr-D keys hold at "
                         f"most {_MAX_ID + 1}.")
    encoder = _Encoder(None if words is None else
                       {w: i for i, w in enumerate(words)})
    codes, lengths = encoder.encode(sentences)
    sentence, keys = _ngram_keys(codes, lengths)
    image = np.repeat(np.arange(len(references)),
                      [len(refs) for refs in references])[sentence]
    unique, inverse = np.unique(keys, return_inverse=True)
    # One count per (image, n-gram) pair: the set over all its references.
    # (Sorted by hand: numpy 2's hashing np.unique is several times slower
    # on tens of millions of int64.)
    pairs = np.sort(image * unique.size + inverse.reshape(-1))
    first = np.ones(pairs.size, bool)
    first[1:] = pairs[1:] != pairs[:-1]
    pairs = pairs[first]
    counts = np.bincount(pairs % unique.size, minlength=unique.size)
    return cls(unique, counts, len(references), words)

  def frequency(self, ngram: Sequence[Token]) -> int:
    """Document frequency of one n-gram (0 when never seen)."""
    if not 1 <= len(ngram) <= MAX_N:
      raise ValueError(f"n-grams have 1 to {MAX_N} tokens, got {ngram!r}.")
    codes, _ = _Encoder.of(self).encode([ngram])
    key = np.uint64(0)
    for c in codes:
      key = (key << np.uint64(_BITS)) | c
    i = np.searchsorted(self.keys, key)
    return int(self.counts[i]) if i < self.keys.size and (
        self.keys[i] == key) else 0

  def idf(self, keys: np.ndarray) -> np.ndarray:
    """coco-caption's `ref_len - log(max(1, df))` of packed n-grams."""
    if not self._frequent_keys.size:
      return np.full(keys.shape, self.ref_len)
    i = np.minimum(np.searchsorted(self._frequent_keys, keys),
                   self._frequent_keys.size - 1)
    return self.ref_len - np.where(self._frequent_keys[i] == keys,
                                   self._log_df[i], 0.0)

  def ngrams(self) -> dict[tuple[Token, ...], int]:
    """All n-grams as token tuples -> document frequency (for inspection)."""
    return dict(zip(self._unpack(self.keys), self.counts.tolist()))

  def _unpack(self, keys: np.ndarray) -> list[tuple[Token, ...]]:
    out = []
    mask = np.uint64((1 << _BITS) - 1)
    for key in keys:
      ids = []
      while key:
        ids.append(int(key & mask) - 1)
        key = key >> np.uint64(_BITS)
      ids.reverse()
      out.append(tuple(ids) if self.words is None else
                 tuple(self.words[i] for i in ids))
    return out

  def save(self, path: str | epath.Path) -> None:
    """Writes the statistics; `path` may be a URL (gs://...).

    A path ending in ".json" gets JSON (per order, the n-grams' token ids
    one after another, and their counts); any other path a compressed
    numpy .npz with the packed keys, about 4x smaller.

    Args:
      path: file to write.
    """
    path = epath.Path(path)
    if path.suffix == ".json":
      orders = _orders(self.keys)
      mask = np.uint64((1 << _BITS) - 1)
      ngrams, counts = [], []
      for n in range(MAX_N):
        keys = self.keys[orders == n]
        # [m, n + 1] token ids, first token first.
        ids = np.stack([(keys >> np.uint64(_BITS * (n - j))) & mask
                        for j in range(n + 1)], axis=1).astype(np.int64) - 1
        ngrams.append(ids.reshape(-1).tolist())
        counts.append(self.counts[orders == n].tolist())
      path.write_text(json.dumps({
          "format": _FORMAT, "version": 1, "num_images": self.num_images,
          "words": None if self.words is None else list(self.words),
          "ngrams": ngrams, "counts": counts}, separators=(",", ":")))
      return
    buffer = io.BytesIO()
    arrays = dict(keys=self.keys, counts=self.counts.astype(np.uint32),
                  num_images=np.int64(self.num_images))
    if self.words is not None:
      arrays["words"] = np.array(self.words, dtype=np.str_)
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())

  @classmethod
  def load(cls, path: str | epath.Path) -> DocumentFrequencies:
    """Reads what `save` wrote (JSON or .npz, told apart by content)."""
    data = epath.Path(path).read_bytes()
    if data[:2] == b"PK":  # A zip archive: the .npz format.
      with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        words = arrays["words"].tolist() if "words" in arrays else None
        return cls(arrays["keys"], arrays["counts"],
                   int(arrays["num_images"]), words)
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
      raise ValueError(f"{path} is not a CIDEr-D document frequency file.")
    keys, counts = [], []
    for n, (flat, cnt) in enumerate(zip(obj["ngrams"], obj["counts"])):
      ids = np.asarray(flat, np.uint64).reshape(-1, n + 1) + np.uint64(1)
      key = np.zeros(len(ids), np.uint64)
      for j in range(n + 1):
        key = (key << np.uint64(_BITS)) | ids[:, j]
      keys.append(key)
      counts.append(np.asarray(cnt, np.int64))
    keys, counts = np.concatenate(keys), np.concatenate(counts)
    order = np.argsort(keys)
    return cls(keys[order], counts[order], obj["num_images"], obj["words"])


def _first_token(sentences: Sequence[Sequence[Token]]) -> Any:
  """The first token of the first non-empty sentence, None if none."""
  for s in sentences:
    if len(s):
      return s[0]
  return None


class _Encoder:
  """Token sequences -> concatenated uint64 codes (id + 1) and lengths.

  For words, ids come from the document frequencies' word list; words not
  in it get ids after it, the same word the same id for as long as this
  encoder lives (so references and candidates agree on them).
  """

  def __init__(self, word_ids: dict[str, int] | None,
               unknown: dict[str, int] | None = None):
    """An encoder of words (`word_ids` given) or of integer ids (None).

    Args:
      word_ids: word -> id, shared, not copied (it may be large).
      unknown: ids already given to words outside `word_ids`; copied, so a
        batch's candidates do not add to its references' table.
    """
    self.strings = word_ids is not None
    self.ids = word_ids
    self.unknown = dict(unknown or {})
    self.next_id = (len(word_ids) if self.strings else 0) + len(self.unknown)

  @classmethod
  def of(cls, df: DocumentFrequencies,
         unknown: dict[str, int] | None = None) -> _Encoder:
    return cls(df._word_ids, unknown)  # pylint: disable=protected-access

  def encode(self, sentences: Any, lengths: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated codes uint64 [total] and lengths int64 [sentences].

    Args:
      sentences: a sequence of token sequences, or an int array
        [sentences, width] of ids whose first `lengths` entries count.
      lengths: with an array, each row's length (default: the full width).
    """
    if isinstance(sentences, np.ndarray) and sentences.ndim == 2:
      if self.strings:
        raise TypeError("An integer token array needs document frequencies "
                        "built from integer ids, these are of words.")
      if lengths is None:
        lengths = np.full(sentences.shape[0], sentences.shape[1], np.int64)
      lengths = np.asarray(lengths, np.int64)
      if lengths.shape != sentences.shape[:1] or (lengths < 0).any() or (
          lengths > sentences.shape[1]).any():
        raise ValueError(f"lengths {lengths.shape} must give 0..width for "
                         f"each row of the {sentences.shape} tokens.")
      ids = sentences[np.arange(sentences.shape[1]) < lengths[:, None]]
      return self._check_ids(ids.astype(np.int64)), lengths
    if lengths is not None:
      raise ValueError("lengths only go with a 2-D token array.")
    lengths = np.fromiter(map(len, sentences), np.int64, len(sentences))
    total = int(lengths.sum())
    token = _first_token(sentences)
    if token is None:
      return np.zeros(0, np.uint64), lengths
    if not self.strings:
      if isinstance(token, str):
        raise TypeError("These document frequencies were built from integer "
                        f"ids, got the word {token!r}.")
      ids = np.fromiter(itertools.chain.from_iterable(sentences), np.int64,
                        total)
      return self._check_ids(ids), lengths
    if not isinstance(token, str):
      raise TypeError("These document frequencies were built from words, got "
                      f"the token {token!r}.")
    tokens = list(itertools.chain.from_iterable(sentences))
    ids = np.fromiter(map(self.ids.get, tokens, itertools.repeat(-1, total)),
                      np.int64, total)
    for i in np.flatnonzero(ids < 0).tolist():
      word = tokens[i]
      if not isinstance(word, str):
        raise TypeError(f"Mixed token types: {word!r} among words.")
      if word not in self.unknown:
        self.unknown[word] = self.next_id
        self.next_id += 1
      ids[i] = self.unknown[word]
    return self._check_ids(ids), lengths

  @staticmethod
  def _check_ids(ids: np.ndarray) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() > _MAX_ID):
      raise ValueError(f"Token ids must be in 0..{_MAX_ID}, got "
                       f"{ids.min()}..{ids.max()}.")
    return ids.astype(np.uint64) + np.uint64(1)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedReferences:
  """A batch's references as tf-idf weights, ready to score many candidates.

  Made by `CiderD.prepare`. The weights of every (reference, n-gram) pair
  are sorted by (image, n-gram), so the references of a candidate's image
  that share one of its n-grams are one binary search away. u: distinct
  n-grams of the batch's references; e: distinct (reference, n-gram) pairs.
  """
  keys: np.ndarray  # uint64 [u], the distinct n-grams, sorted.
  image_ngram: np.ndarray  # int64 [e], image * u + n-gram index, sorted.
  weights: np.ndarray  # float64 [e], tf-idf weight.
  slot: np.ndarray  # int64 [e], which of its image's references.
  order: np.ndarray  # int64 [e], n - 1.
  norms: np.ndarray  # float64 [images, max refs, MAX_N], 0 for padding.
  lengths: np.ndarray  # int64 [images, max refs], bigram counts.
  num_refs: np.ndarray  # int64 [images]
  # Ids given to words outside the frequencies, for the candidates to match.
  unknown: dict[str, int]
  # The frequencies the weights were made with (checked by `score`).
  df: DocumentFrequencies = dataclasses.field(repr=False)

  @property
  def num_images(self) -> int:
    return int(self.num_refs.size)


class CiderD:
  """coco-caption's CIDEr-D against fixed document frequencies.

  Scores token sequences as given: pycocoevalcap's PTB tokenizer is not
  applied, so tokenise references and candidates the same way first (e.g.
  `vocabulary.tokenize`, or vocabulary ids without BOS/EOS/PAD).
  """

  def __init__(self, df: DocumentFrequencies, sigma: float = SIGMA):
    """Scorer for `df`; sigma is the length penalty's standard deviation."""
    self.df = df
    self.sigma = float(sigma)

  def prepare(self, references: Sequence[TokenSequences]
              ) -> PreparedReferences:
    """Weights and norms of a batch's references, computed once.

    Args:
      references: one entry per image: its reference captions (at least
        one), each a sequence of tokens of the frequencies' kind.

    Returns:
      What `score` takes as `references`.
    """
    num_refs = np.fromiter(map(len, references), np.int64, len(references))
    if not num_refs.size or num_refs.min() < 1:
      raise ValueError("Every image needs at least one reference caption "
                       "(and there must be at least one image).")
    encoder = _Encoder.of(self.df)
    codes, lengths = encoder.encode(
        [ref for refs in references for ref in refs])
    sentence, keys = _ngram_keys(codes, lengths)
    keys, ref, ngram, tf = _term_frequencies(sentence, keys)
    order_of = _orders(keys)
    weights = tf * self.df.idf(keys)[ngram]
    order = order_of[ngram]
    num_sentences = lengths.size
    norms = np.sqrt(np.bincount(ref * MAX_N + order, weights * weights,
                                minlength=num_sentences * MAX_N))
    # Each reference's image and its position among the image's references.
    image = np.repeat(np.arange(num_refs.size), num_refs)
    slot = np.arange(num_sentences) - (np.cumsum(num_refs) - num_refs)[image]
    max_refs = int(num_refs.max())
    padded_norms = np.zeros((num_refs.size, max_refs, MAX_N))
    padded_norms[image, slot] = norms.reshape(num_sentences, MAX_N)
    padded_lengths = np.zeros((num_refs.size, max_refs), np.int64)
    padded_lengths[image, slot] = _bigram_lengths(lengths)
    image_ngram = image[ref] * keys.size + ngram
    by_image_ngram = np.argsort(image_ngram, kind="stable")
    return PreparedReferences(
        keys=keys, image_ngram=image_ngram[by_image_ngram],
        weights=weights[by_image_ngram], slot=slot[ref][by_image_ngram],
        order=order[by_image_ngram], norms=padded_norms,
        lengths=padded_lengths, num_refs=num_refs, unknown=encoder.unknown,
        df=self.df)

  def score(self, candidates: TokenSequences | np.ndarray,
            references: Sequence[TokenSequences] | PreparedReferences,
            image_index: Sequence[int] | None = None, *,
            lengths: np.ndarray | None = None) -> np.ndarray:
    """CIDEr-D of each candidate against its image's references.

    Args:
      candidates: token sequences, or an int array [num_candidates, width]
        of vocabulary ids (with `lengths`).
      references: one entry per image: its reference captions; or
        `prepare(references)`, to reuse their weights across calls.
      image_index: int [num_candidates], the image of each candidate (e.g.
        `np.repeat(np.arange(b), k)` for K samples of each of b images).
        Default: candidate i belongs to image i.
      lengths: with a token array, each row's caption length (the tokens
        before EOS); default the full width.

    Returns:
      float64 [num_candidates], coco-caption's per-image CIDEr-D scores
      (scaled by 10).
    """
    if not isinstance(references, PreparedReferences):
      references = self.prepare(references)
    prep = references
    if prep.df is not self.df:
      raise ValueError("These references were prepared with other document "
                       "frequencies; prepare them with this scorer.")
    encoder = _Encoder.of(self.df, prep.unknown)
    codes, cand_lengths = encoder.encode(candidates, lengths)
    num = cand_lengths.size
    if image_index is None:
      if num != prep.num_images:
        raise ValueError(f"{num} candidates for {prep.num_images} images: "
                         "pass image_index.")
      image_index = np.arange(num)
    image_index = np.asarray(image_index, np.int64)
    if image_index.shape != (num,) or (num and (
        image_index.min() < 0 or image_index.max() >= prep.num_images)):
      raise ValueError("image_index must give an image in 0.."
                       f"{prep.num_images - 1} for each of the {num} "
                       "candidates.")
    max_refs = prep.norms.shape[1]
    sentence, keys = _ngram_keys(codes, cand_lengths)
    keys, cand, ngram, tf = _term_frequencies(sentence, keys)
    weights = tf * self.df.idf(keys)[ngram]
    order = _orders(keys)[ngram]
    norms = np.sqrt(np.bincount(cand * MAX_N + order, weights * weights,
                                minlength=num * MAX_N)).reshape(num, MAX_N)
    # Only n-grams that some reference of the batch has can add to a dot
    # product; find each in the references' table.
    at = np.minimum(np.searchsorted(prep.keys, keys),
                    max(prep.keys.size - 1, 0))
    ref_ngram = (np.where(prep.keys[at] == keys, at, -1)[ngram]
                 if prep.keys.size else np.full(ngram.shape, -1))
    shared = ref_ngram >= 0
    cand, order, weights = cand[shared], order[shared], weights[shared]
    query = image_index[cand] * prep.keys.size + ref_ngram[shared]
    lo = np.searchsorted(prep.image_ngram, query, "left")
    hi = np.searchsorted(prep.image_ngram, query, "right")
    # One row per (candidate n-gram, reference of its image with it).
    hits = hi - lo
    row = np.repeat(np.arange(query.size), hits)
    entry = lo[row] + np.arange(row.size) - np.repeat(np.cumsum(hits) - hits,
                                                      hits)
    ref_weight = prep.weights[entry]
    # coco-caption's clipping: min(hyp, ref) * ref.
    dots = np.bincount(
        (cand[row] * max_refs + prep.slot[entry]) * MAX_N + order[row],
        np.minimum(weights[row], ref_weight) * ref_weight,
        minlength=num * max_refs * MAX_N).reshape(num, max_refs, MAX_N)
    denominator = norms[:, None, :] * prep.norms[image_index]
    # coco divides only when both norms are non-zero (else the dot is 0).
    cosine = dots / np.where(denominator != 0, denominator, 1.0)
    delta = (_bigram_lengths(cand_lengths)[:, None]
             - prep.lengths[image_index]).astype(np.float64)
    penalty = np.exp(-(delta * delta) / (2 * self.sigma**2))
    # Padding references have zero dots, so they add nothing.
    per_ref = (cosine * penalty[:, :, None]).sum(axis=(1, 2))
    return per_ref / MAX_N / prep.num_refs[image_index] * 10.0
