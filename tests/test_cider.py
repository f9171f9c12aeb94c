"""cider.CiderD against pycocoevalcap's Cider, and its own invariants."""

import numpy as np
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
import pytest

from visionspeak_jax.evaluation import cider
from visionspeak_jax.text import vocabulary

_TOL = 1e-6


def _coco(candidates, references):
  """pycocoevalcap's (mean, per-image scores) on pre-split token lists.

  Tokens are joined with spaces and coco splits on white space again, so
  both sides see the same tokens and no PTB tokenizer runs.
  """
  gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
  res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
  mean, scores = Cider().compute_score(gts, res)
  return mean, np.asarray(scores)


def _ours(candidates, references):
  """Our scores with the frequencies coco uses: those of the scored set."""
  df = cider.DocumentFrequencies.build(references)
  return cider.CiderD(df).score(candidates, references)


def _assert_same_as_coco(candidates, references):
  mean, expected = _coco(candidates, references)
  got = _ours(candidates, references)
  np.testing.assert_allclose(got, expected, rtol=0, atol=_TOL)
  assert abs(got.mean() - mean) < _TOL
  return got


def _split(captions):
  return [c.split() for c in captions]


# Each case is one image: (candidate, references). Scored all together, so
# the document frequencies are those of a small corpus, as in coco.
_CASES = {
    "identical": ("a red circle above a blue square",
                  ["a red circle above a blue square",
                   "a blue square below a red circle",
                   "two shapes a circle and a square"]),
    "no_overlap": ("zebra giraffe elephant",
                   ["a man riding a horse", "a person on a horse"]),
    "repeated_words": ("a a a a dog dog dog",
                       ["a dog on a couch", "a dog dog sleeping",
                        "the dog is a good dog"]),
    "longer": ("a man riding a horse on a beach next to the sea at sunset "
               "with a dog running behind them",
               ["a man riding a horse", "a person on a horse on a beach",
                "a rider on the beach"]),
    "shorter": ("horse", ["a man riding a horse", "a horse on a beach"]),
    "two_words": ("a horse", ["a man riding a horse", "a horse"]),
    "empty": ("", ["a cat on a mat", "a cat sitting on a mat"]),
    "one_ref": ("a cat on a mat", ["the cat sat on the mat"]),
    "five_refs": ("a cat on a mat",
                  ["the cat sat on the mat", "a cat on a mat",
                   "a cat lying on a red mat", "a kitten on a rug",
                   "there is a cat on the mat"]),
    "empty_ref": ("a dog", ["", "a dog running", "a brown dog"]),
    "unicode": ("un café près de la tour 東京 タワー",
                ["un café près de la tour", "東京 タワー の 近く の café",
                 "ein Café neben dem Turm ünd straße"]),
    "unseen_ngrams": ("qwerty asdf a dog zxcv",
                      ["a dog on a couch", "a dog in the park"]),
}


def test_hand_made_cases_equal_coco():
  names = list(_CASES)
  candidates = [_CASES[n][0].split() for n in names]
  references = [_split(_CASES[n][1]) for n in names]
  got = _assert_same_as_coco(candidates, references)
  by_name = dict(zip(names, got))
  assert by_name["identical"] > 1.0
  assert by_name["no_overlap"] == 0.0
  assert by_name["empty"] == 0.0
  assert by_name["longer"] < by_name["two_words"]


@pytest.mark.parametrize("name", ["identical", "repeated_words", "five_refs"])
def test_one_image_corpus_equals_coco(name):
  # log(1) = 0: every weight is zero and so is every score.
  candidate, refs = _CASES[name]
  got = _assert_same_as_coco([candidate.split()], [_split(refs)])
  assert got.tolist() == [0.0]


def _shapes_captions(num_images):
  from visionspeak_jax.data.datasets import shapes
  return [
      shapes.generate_example(shapes.example_rng("validation", i),
                              shapes.example_id("validation", i))["captions"]
      for i in range(num_images)
  ]


@pytest.fixture(scope="module")
def shapes_set():
  """100 images' five shapes captions, as token lists."""
  return [_split(caps) for caps in _shapes_captions(100)]


def _shapes_candidates(references, seed=0):
  """Another image's caption, a perturbed reference, or a reference."""
  rng = np.random.default_rng(seed)
  vocab = sorted({w for refs in references for r in refs for w in r})
  candidates = []
  for i, refs in enumerate(references):
    kind = i % 3
    if kind == 0:
      other = (i + 1 + rng.integers(len(references) - 1)) % len(references)
      candidates.append(list(references[other][rng.integers(5)]))
    else:
      words = list(refs[rng.integers(len(refs))])
      if kind == 1:
        # Drop, replace and insert a word: changes n-grams and the length.
        del words[rng.integers(len(words))]
        words[rng.integers(len(words))] = vocab[rng.integers(len(vocab))]
        words.insert(rng.integers(len(words) + 1), "unseen")
      candidates.append(words)
  return candidates


def test_shapes_captions_equal_coco(shapes_set):
  candidates = _shapes_candidates(shapes_set)
  got = _assert_same_as_coco(candidates, shapes_set)
  assert got.std() > 0.1  # A spread of scores, not a degenerate test.


def test_document_frequencies_equal_coco(shapes_set):
  scorer = CiderScorer(n=4)
  for refs in shapes_set:
    scorer += (None, [" ".join(r) for r in refs])
  scorer.compute_doc_freq()
  df = cider.DocumentFrequencies.build(shapes_set)
  assert df.ngrams() == dict(scorer.document_frequency)
  assert df.num_images == 100
  assert df.ref_len == pytest.approx(np.log(100.0))
  assert df.frequency(("a",)) == 100
  assert df.frequency(("no", "such", "words")) == 0


def _as_ids(sentences_per_image, word_ids):
  return [[[word_ids[w] for w in s] for s in image]
          for image in sentences_per_image]


def test_ids_score_as_their_words(shapes_set):
  candidates = _shapes_candidates(shapes_set, seed=1)
  # The run's vocabulary ids, as the SCST step scores them.
  vocab = vocabulary.Vocabulary.build(
      [" ".join(r) for refs in shapes_set for r in refs]
      + [" ".join(c) for c in candidates])
  ref_ids = [[vocab.encode(" ".join(r)) for r in refs] for refs in shapes_set]
  cand_ids = [vocab.encode(" ".join(c)) for c in candidates]
  assert all(vocab.decode(c) == w for c, w in zip(cand_ids, candidates))
  by_words = _ours(candidates, shapes_set)
  by_ids = _ours(cand_ids, ref_ids)
  np.testing.assert_allclose(by_ids, by_words, rtol=0, atol=1e-12)
  # Tuples and numpy rows are token sequences too.
  df = cider.DocumentFrequencies.build(ref_ids)
  as_tuples = cider.CiderD(df).score([tuple(c) for c in cand_ids],
                                     [[np.asarray(r) for r in refs]
                                      for refs in ref_ids])
  np.testing.assert_allclose(as_tuples, by_words, rtol=0, atol=1e-12)


def test_token_array_with_lengths(shapes_set):
  candidates = _shapes_candidates(shapes_set, seed=2)
  words = sorted({w for refs in shapes_set for r in refs for w in r}
                 | {w for c in candidates for w in c})
  word_ids = {w: i + 4 for i, w in enumerate(words)}
  ref_ids = _as_ids(shapes_set, word_ids)
  cand_ids = _as_ids([candidates], word_ids)[0]
  width = max(map(len, cand_ids)) + 3
  tokens = np.full((len(cand_ids), width), 2, np.int32)  # EOS, then more.
  for i, c in enumerate(cand_ids):
    tokens[i, :len(c)] = c
  scorer = cider.CiderD(cider.DocumentFrequencies.build(ref_ids))
  np.testing.assert_allclose(
      scorer.score(tokens, ref_ids, lengths=[len(c) for c in cand_ids]),
      scorer.score(cand_ids, ref_ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tokens", ["words", "ids"])
def test_k_samples_per_image_equal_repeated_references(shapes_set, tokens):
  k = 5
  references = shapes_set[:64]
  rng = np.random.default_rng(3)
  # K candidates for each image: its own captions and others' captions.
  candidates = [
      list(shapes_set[i if rng.random() < 0.5 else rng.integers(100)]
           [rng.integers(5)]) for i in range(len(references)) for _ in range(k)
  ]
  if tokens == "ids":
    words = sorted({w for refs in shapes_set for r in refs for w in r})
    word_ids = {w: i for i, w in enumerate(words)}
    references = _as_ids(references, word_ids)
    candidates = _as_ids([candidates], word_ids)[0]
    shapes_refs = _as_ids(shapes_set, word_ids)
  else:
    shapes_refs = shapes_set
  scorer = cider.CiderD(cider.DocumentFrequencies.build(shapes_refs))
  image_index = np.repeat(np.arange(len(references)), k)
  repeated = scorer.score(candidates, [references[i] for i in image_index])
  indexed = scorer.score(candidates, references, image_index)
  prepared = scorer.prepare(references)
  np.testing.assert_allclose(indexed, repeated, rtol=0, atol=1e-12)
  np.testing.assert_allclose(scorer.score(candidates, prepared, image_index),
                             repeated, rtol=0, atol=1e-12)
  # A prepared batch is reusable: a second call gives the same.
  np.testing.assert_allclose(scorer.score(candidates, prepared, image_index),
                             repeated, rtol=0, atol=1e-12)
  assert repeated.shape == (len(candidates),)
  assert repeated.max() > 1.0


def test_unknown_words_match_between_references_and_candidates():
  # Words outside the frequencies' vocabulary still match each other (df 0).
  df = cider.DocumentFrequencies.build([[["a", "dog"]], [["a", "cat"]]])
  scorer = cider.CiderD(df)
  refs = [[["a", "zebra", "grazing"]]]
  prepared = scorer.prepare(refs)
  same = scorer.score([["a", "zebra", "grazing"]], prepared)
  other = scorer.score([["a", "okapi", "grazing"]], prepared)
  assert same[0] > other[0] > 0.0


@pytest.mark.parametrize("suffix", [".json", ".npz"])
@pytest.mark.parametrize("tokens", ["words", "ids"])
def test_save_load_round_trip(shapes_set, tmp_path, suffix, tokens):
  references = [refs + [["ünïcode", "東京"]] for refs in shapes_set[:20]]
  if tokens == "ids":
    words = sorted({w for refs in references for r in refs for w in r})
    references = _as_ids(references, {w: i for i, w in enumerate(words)})
  df = cider.DocumentFrequencies.build(references)
  path = tmp_path / f"df{suffix}"
  df.save(str(path))
  loaded = cider.DocumentFrequencies.load(str(path))
  assert loaded.num_images == df.num_images == 20
  assert loaded.words == df.words
  assert (tokens == "ids") == (loaded.words is None)
  np.testing.assert_array_equal(loaded.keys, df.keys)
  np.testing.assert_array_equal(loaded.counts, df.counts)
  assert loaded.ngrams() == df.ngrams()
  candidates = [refs[0] for refs in references[1:]] + [references[0][1]]
  np.testing.assert_array_equal(
      cider.CiderD(loaded).score(candidates, references),
      cider.CiderD(df).score(candidates, references))


def test_npz_is_smaller_than_json(shapes_set, tmp_path):
  df = cider.DocumentFrequencies.build(shapes_set)
  df.save(str(tmp_path / "df.json"))
  df.save(str(tmp_path / "df.npz"))
  assert (tmp_path / "df.npz").stat().st_size < (
      tmp_path / "df.json").stat().st_size


def test_load_rejects_other_json(tmp_path):
  path = tmp_path / "vocab.json"
  path.write_text('{"words": ["<pad>"]}')
  with pytest.raises(ValueError, match="not a CIDEr-D"):
    cider.DocumentFrequencies.load(str(path))


def test_errors():
  word_df = cider.DocumentFrequencies.build([[["a", "dog"]], [["a", "cat"]]])
  id_df = cider.DocumentFrequencies.build([[[4, 5]], [[4, 6]]])
  with pytest.raises(ValueError, match="at least one reference"):
    cider.CiderD(word_df).score([["a"]], [[]])
  with pytest.raises(TypeError, match="integer ids"):
    cider.CiderD(id_df).score([["a"]], [[[4, 5]]])
  with pytest.raises(TypeError, match="built from words"):
    cider.CiderD(word_df).score([[4]], [[["a"]]])
  with pytest.raises(ValueError, match="Token ids"):
    cider.CiderD(id_df).score([[70000]], [[[4, 5]]])
  with pytest.raises(ValueError, match="pass image_index"):
    cider.CiderD(id_df).score([[4], [5]], [[[4, 5]]])
  with pytest.raises(ValueError, match="image_index"):
    cider.CiderD(id_df).score([[4], [5]], [[[4, 5]]], [0, 1])
  with pytest.raises(ValueError, match="at least one image"):
    cider.DocumentFrequencies.build([])
  prepared = cider.CiderD(id_df).prepare([[[4, 5]]])
  with pytest.raises(ValueError, match="other document frequencies"):
    cider.CiderD(word_df).score([[4]], prepared)


def test_all_empty_candidates_and_references():
  df = cider.DocumentFrequencies.build([[[4, 5]], [[4, 6]]])
  scorer = cider.CiderD(df)
  np.testing.assert_array_equal(scorer.score([[], []], [[[4]], [[5]]]),
                                [0.0, 0.0])
  np.testing.assert_array_equal(scorer.score([[4], []], [[[]], [[]]]),
                                [0.0, 0.0])
