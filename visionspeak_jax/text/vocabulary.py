"""Word vocabulary: build from training captions, save/load JSON, encode/decode.

Captions become words as Karpathy's `tokens` in dataset_coco.json,
dataset_flickr8k.json and dataset_flickr30k.json, which both PyTorch
references train on (sgrvinod's `utils.create_input_files` reads
`c['tokens']`, ruotianluo's `scripts/prepro_labels.py` reads
`sent['tokens']`). The rule is the one of karpathy/neuraltalk2's `prepro.py`
(`prepro_captions`): lowercase, delete punctuation, split on white space. So
"'Stop'" is "stop", "there's" and "there ' s" are "theres" and "there s",
"t-shirt" is "tshirt", and "café" stays "café".

Punctuation is Python's `string.punctuation` (what prepro.py deletes; its
ASCII symbols such as + and $ included) and every other Unicode punctuation
character: prepro.py read ASCII only, and a curly apostrophe must go as the
straight one does. Letters keep their accents; other symbols stay.

`tf_tokenize` is the same rule in TensorFlow ops, for the input pipeline.
Both sides take their punctuation and white space from one table built here
from Python's `unicodedata`, so these are the same characters whatever
Unicode version TensorFlow's RE2 knows.
"""

import collections
import functools
import json
import re
import string
import unicodedata
from typing import Iterable, Sequence

from etils import epath

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# Unicode assigns no punctuation or white space past the first two planes
# (the others hold CJK ideographs, tags, variation selectors and private
# use), so scanning them would only slow the first caption of every process;
# tests/test_vocabulary.py checks the whole range.
_SCANNED = 0x20000


def _is_punctuation(char: str) -> bool:
  return (char in string.punctuation
          or unicodedata.category(char).startswith("P"))


def _ranges(test, end: int = _SCANNED) -> list[tuple[int, int]]:
  """Inclusive code point ranges [(first, last), ...] where `test` holds."""
  ranges = []
  for code in range(end):
    if test(chr(code)):
      if ranges and ranges[-1][1] == code - 1:
        ranges[-1] = (ranges[-1][0], code)
      else:
        ranges.append((code, code))
  return ranges


@functools.cache
def _character_classes() -> dict[str, tuple[str, str]]:
  """Regex classes of the punctuation and the white space: {name: (Python
  `re` pattern, RE2 pattern for TensorFlow)}."""
  classes = {}
  for name, test in (("punctuation", _is_punctuation),
                     ("space", str.isspace)):
    ranges = _ranges(test)
    python = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    re2 = "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges)
    classes[name] = (f"[{python}]+", f"[{re2}]+")
  return classes


@functools.cache
def _punctuation_re() -> re.Pattern[str]:
  return re.compile(_character_classes()["punctuation"][0])


def tokenize(text: str) -> list[str]:
  """Lowercases a caption, deletes its punctuation, splits it into words."""
  # str.split splits on exactly the characters for which isspace() holds,
  # the class tf_tokenize turns into spaces.
  return _punctuation_re().sub("", text.lower()).split()


def tf_tokenize(text):
  """`tokenize` in TensorFlow ops: a string -> its words (1-D); [N]
  strings -> [N, None] words (ragged)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  classes = _character_classes()
  # Without encoding="utf-8" tf.strings.lower leaves non-ASCII letters as
  # they are ("É" would stay upper case); with it, it applies Unicode's full
  # case mapping as str.lower does.
  text = tf.strings.lower(text, encoding="utf-8")
  text = tf.strings.regex_replace(text, classes["punctuation"][1], "")
  # tf.strings.split without a separator splits on ASCII white space only.
  text = tf.strings.regex_replace(text, classes["space"][1], " ")
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

    The references keep words seen more than 5 times (sgrvinod's
    `create_input_files(min_word_freq=5)`, ruotianluo's `prepro_labels.py`
    `--word_count_threshold 5`): that is `min_count=6`.

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
