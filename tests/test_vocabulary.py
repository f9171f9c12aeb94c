"""Tests of the vocabulary."""

import json

import pytest
import tensorflow as tf

from visionspeak_jax.text import vocabulary as vocab_lib


def test_build_counts_and_orders():
  vocab = vocab_lib.Vocabulary.build(
      ["A red circle.", "a blue circle", "A RED square!", "zebra"],
      min_count=2)
  assert vocab.words[:4] == list(vocab_lib.SPECIALS)
  # a:3, circle:2, red:2; ties broken alphabetically; rare words dropped.
  assert vocab.words[4:] == ["a", "circle", "red"]
  assert vocab.encode("a zebra circle") == [4, vocab_lib.UNK_ID, 5]


def test_decode_stops_at_eos_and_skips_pad_bos():
  vocab = vocab_lib.Vocabulary.build(["a red circle"])
  ids = [vocab_lib.BOS_ID] + vocab.encode("a red circle") + [
      vocab_lib.EOS_ID] + vocab.encode("red red")
  assert vocab.decode(ids) == ["a", "red", "circle"]
  assert vocab.decode([vocab_lib.PAD_ID, 4]) == ["a"]
  # Positions index the kept tokens, so per-token maps stay aligned.
  words, positions = vocab.decode_with_positions(
      [4, vocab_lib.PAD_ID, 5, vocab_lib.BOS_ID, 6, vocab_lib.EOS_ID, 4])
  assert words == ["a", "circle", "red"] and positions == [0, 2, 4]


def test_json_round_trip(tmp_path):
  vocab = vocab_lib.Vocabulary.build(["one two two"])
  path = str(tmp_path / "vocab.json")
  vocab.save(path)
  assert vocab_lib.Vocabulary.load(path) == vocab
  with open(path, "w") as f:
    json.dump([1, 2], f)
  with pytest.raises(ValueError, match="Not a vocabulary"):
    vocab_lib.Vocabulary.load(path)
  with pytest.raises(ValueError, match="special tokens"):
    vocab_lib.Vocabulary(["a", "b"])


@pytest.mark.parametrize("text", [
    "A man riding a horse.", "  two   dogs,  playing!", "it's a cat's toy",
    "Hello-world 42 times", ""])
def test_tf_tokenize_agrees_with_python(text):
  tf_words = [w.decode() for w in vocab_lib.tf_tokenize(tf.constant(text))
              .numpy()]
  assert tf_words == vocab_lib.tokenize(text)
