"""Word vocabulary: build from training captions, save/load JSON, encode/decode.

Tokenisation is deliberately simple and has a twin in TensorFlow ops
(`tf_tokenize`), so the input pipeline and the Python side agree word for word:
lowercase, every character other than a-z, 0-9 and ' becomes a space, split
on white space.
"""

import collections
import json
import re
from typing import Iterable, Sequence

from etils import epath

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
_NON_WORD = r"[^a-z0-9']+"


def tokenize(text: str) -> list[str]:
  """Lowercases and splits a caption into words."""
  return re.sub(_NON_WORD, " ", text.lower()).split()


def tf_tokenize(text):
  """`tokenize` in TensorFlow ops: a string -> its words (1-D); [N]
  strings -> [N, None] words (ragged)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  text = tf.strings.regex_replace(tf.strings.lower(text), _NON_WORD, " ")
  return tf.strings.split(tf.strings.strip(text))


class Vocabulary:
  """Maps words to ids; ids 0..3 are PAD, BOS, EOS and UNK."""

  def __init__(self, words: Sequence[str]):
    words = list(words)
    if tuple(words[:4]) != SPECIALS:
      raise ValueError("A vocabulary must start with the special tokens "
                       f"{SPECIALS}.")
    if len(set(words)) != len(words):
      raise ValueError("A vocabulary must not repeat words.")
    self.words = words
    self._ids = {w: i for i, w in enumerate(words)}

  def __len__(self) -> int:
    return len(self.words)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocabulary) and self.words == other.words

  @classmethod
  def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocabulary":
    """Keeps words seen at least `min_count` times, most frequent first.

    Ties are broken alphabetically so the same captions always give the
    same ids.
    """
    counts = collections.Counter(w for c in captions for w in tokenize(c))
    kept = sorted((w for w, n in counts.items()
                   if n >= min_count and w not in SPECIALS),
                  key=lambda w: (-counts[w], w))
    return cls(list(SPECIALS) + kept)

  def to_json(self) -> dict:
    return {"words": self.words}

  @classmethod
  def from_json(cls, data: dict) -> "Vocabulary":
    if not isinstance(data, dict) or "words" not in data:
      raise ValueError("Not a vocabulary file: expected a JSON object with "
                       "a 'words' list.")
    return cls(data["words"])

  def save(self, path: str) -> None:
    """Writes the JSON file; `path` may be a URL (gs://...)."""
    epath.Path(path).write_text(json.dumps(self.to_json()))

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    return cls.from_json(json.loads(epath.Path(path).read_text()))

  def encode(self, text: str) -> list[int]:
    """Word ids of a caption, without BOS/EOS; unknown words map to UNK."""
    return [self._ids.get(w, UNK_ID) for w in tokenize(text)]

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Words up to (not including) the first EOS, skipping PAD and BOS."""
    return self.decode_with_positions(ids)[0]

  def decode_with_positions(self, ids: Iterable[int]
                            ) -> tuple[list[str], list[int]]:
    """`decode`, plus the index in `ids` of every word kept.

    Per-token data (e.g. attention maps) indexed by the positions stays
    aligned with the words even when PAD or BOS was skipped.
    """
    words, positions = [], []
    for t, i in enumerate(ids):
      i = int(i)
      if i == EOS_ID:
        break
      if i in (PAD_ID, BOS_ID):
        continue
      words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
      positions.append(t)
    return words, positions
