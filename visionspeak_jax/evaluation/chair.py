"""CHAIR: how often captions name objects that are not in the image.

Rohrbach, Hendricks, Burns, Darrell and Saenko, "Object Hallucination in
Image Captioning" (EMNLP 2018), read each caption's object words through a
synonym table of the 80 MSCOCO categories and count:

  CHAIR-i = hallucinated object mentions / all object mentions
  CHAIR-s = captions with at least one hallucinated mention / all captions

A mention is hallucinated when its category is not among the image's
objects, which are its instance labels together with every category its
reference captions name. `chair` also reports coverage, the share of an
image's objects that its caption names (see `chair` for the exact
definition), because a model can lower CHAIR by naming fewer objects.

The rules follow the authors' code, github.com/LisaAnne/Hallucination
`utils/chair.py` (commit 6e4d33c): `CHAIR.__init__` for the synonym table,
the double words and the special cases (`COCO_COMPOUNDS`,
`COCO_DROPPED_WITH`), `CHAIR.caption_to_words` for reading a caption
(`mentions`), `get_annotations_from_segments` and
`get_annotations_from_captions` for an image's objects
(`image_objects_from`), and `compute_chair` for the counting (`chair`). The
synonym table is their `data/synonyms.txt`, kept as data in
`data/coco_synonyms.txt`. Where this module differs, it does what their code
means to do, without its dependencies (nltk, pattern):

- Tokens: the lowercased caption's runs of letters and digits, a hyphenated
  word kept whole, as `nltk.word_tokenize` does; an apostrophe splits
  ("dog's" -> "dog", "s") as nltk splits off "'s".
- Plurals: theirs runs pattern.en's `singularize` on every token; here a
  token is made singular only when that gives a word of the table (regular
  endings and the irregular plurals in `_IRREGULAR`), so "bus" stays "bus"
  and "glasses" becomes "glass" (their table carries "knive", "phon" and
  "wine glas" to catch `singularize`'s output; those entries are harmless).
- Phrases: any length, longest first, left to right; theirs joins pairs only,
  so its "stove top oven" never matches. Names are stripped and lowercased,
  so the source's " motor bike", " cheesecake" and "iPhone" now match.

The table is data: `WordTable.from_dict` builds one for another object set,
e.g. the shapes set's (colour, shape) names.

Usage:

  table = chair.coco_table()
  objects = {i: chair.image_objects_from(labels[i], references[i], table)
             for i in captions}
  result = chair.chair(captions, objects, table)
  result["chair_i"], result["chair_s"], result["coverage"]
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import re
import types
from typing import Any, Hashable, Iterable, Mapping

# Rohrbach et al.'s special cases (`CHAIR.__init__`), as phrase -> the word it
# is read as. Their other "double words" ("hot dog", "teddy bear", "fire
# hydrant", "motor bike", ...) are names in the table, which are read whole
# anyway; the ones that are not ("home plate", "train track") map to
# themselves, so their words are not read alone: a train track is no train.
_AGE_QUALIFIED = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
                  "bear", "zebra", "giraffe", "animal", "cub")
COCO_COMPOUNDS: Mapping[str, str] = types.MappingProxyType({
    # "baby"/"adult" alone name a person; before an animal they are its age.
    **{f"{age} {animal}": animal for age in ("baby", "adult")
       for animal in _AGE_QUALIFIED},
    # "passenger" alone names a person; a passenger jet is an airplane.
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    # "seat" alone is a chair.
    "toilet seat": "toilet",
    "home plate": "home plate",
    "train track": "train track",
})
# word -> word: the first is no object when the second is in the caption too,
# so "the seat of the toilet" names no chair (`caption_to_words`).
COCO_DROPPED_WITH: Mapping[str, str] = types.MappingProxyType(
    {"seat": "toilet"})

_COCO_FILE = "data/coco_synonyms.txt"
# A token: letters and digits, hyphenated parts kept together (nltk does).
_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*")
# Plurals that no ending rule turns back into a table word.
_IRREGULAR = {"people": "person", "mice": "mouse", "geese": "goose",
              "oxen": "ox", "feet": "foot", "teeth": "tooth"}
# (plural ending, singular ending), tried in turn; the first result that is a
# word of the table wins, so a rule that fits a non-plural does no harm.
_ENDINGS = (("children", "child"), ("men", "man"), ("ies", "y"),
            ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", ""))


def _normal(name: str) -> str:
  """A name as tokens match it: lowercase, single spaces, no edge spaces."""
  return " ".join(name.lower().split())


@dataclasses.dataclass(frozen=True)
class WordTable:
  """Which words and phrases name which object category.

  Attributes:
    categories: the category names, in table order.
    names: word or phrase (lowercase, singular, single spaces) -> category.
      Every category names itself.
    compounds: phrase -> the word or phrase it is read as, checked before
      `names`. A phrase that maps to a non-name keeps its words from being
      read alone.
    dropped_with: word -> word; the first is not read as an object in a
      caption that also has the second.
  """
  categories: tuple[str, ...]
  names: Mapping[str, str]
  compounds: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}))
  dropped_with: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}))

  @classmethod
  def from_dict(cls, synonyms: Mapping[str, Iterable[str]],
                compounds: Mapping[str, str] | None = None,
                dropped_with: Mapping[str, str] | None = None) -> WordTable:
    """A table from {category: its other names}.

    Args:
      synonyms: category -> words or phrases that also name it, singular.
        Names are lowercased and their spaces normalised.
      compounds: see the class; e.g. `COCO_COMPOUNDS`.
      dropped_with: see the class; e.g. `COCO_DROPPED_WITH`.

    Returns:
      The table.

    Raises:
      ValueError: if a name is empty or names two categories.
    """
    names = {}
    categories = []
    for category, others in synonyms.items():
      category = _normal(category)
      categories.append(category)
      for name in (category, *map(_normal, others)):
        if not name:
          raise ValueError(f"Category {category!r} has an empty name.")
        if names.setdefault(name, category) != category:
          raise ValueError(f"{name!r} names both {names[name]!r} and "
                           f"{category!r}; keep it in one category.")
    return cls(
        categories=tuple(categories),
        names=types.MappingProxyType(names),
        compounds=types.MappingProxyType(
            {_normal(k): _normal(v) for k, v in (compounds or {}).items()}),
        dropped_with=types.MappingProxyType(
            {_normal(k): _normal(v) for k, v in (dropped_with or {}).items()}))

  @classmethod
  def parse(cls, text: str, **kwargs: Any) -> WordTable:
    """A table from `data/coco_synonyms.txt`'s format.

    Args:
      text: one category a line, its name first, then its synonyms, all
        separated by commas; blank lines and lines starting "#" are skipped.
      **kwargs: `compounds` and `dropped_with`, as for `from_dict`.

    Returns:
      The table.
    """
    synonyms = {}
    for line in text.splitlines():
      if line.strip() and not line.lstrip().startswith("#"):
        category, *others = line.split(",")
        synonyms[category] = others
    return cls.from_dict(synonyms, **kwargs)

  @functools.cached_property
  def _readings(self) -> dict[str, str]:
    """Multi-word phrase -> what it is read as: compounds over names."""
    phrases = {name: name for name in self.names if " " in name}
    phrases.update((k, v) for k, v in self.compounds.items() if " " in k)
    return phrases

  @functools.cached_property
  def _longest(self) -> int:
    return max((p.count(" ") + 1 for p in self._readings), default=1)

  @functools.cached_property
  def _vocabulary(self) -> frozenset[str]:
    """Every word a singular token may become: the words of all phrases."""
    words = set()
    for phrase in (*self.names, *self.compounds, *self.compounds.values()):
      words.update(phrase.split())
    return frozenset(words)

  def singular(self, token: str) -> str:
    """`token` made singular if that gives a word of the table, else as is."""
    if token in self._vocabulary:
      return token
    irregular = _IRREGULAR.get(token)
    if irregular in self._vocabulary:
      return irregular
    for plural, single in _ENDINGS:
      if token.endswith(plural):
        candidate = token[:len(token) - len(plural)] + single
        if candidate in self._vocabulary:
          return candidate
    return token

  def read(self, caption: str) -> list[str]:
    """The caption's words after plurals and phrases, objects or not."""
    words = [self.singular(t) for t in _TOKEN.findall(caption.lower())]
    read = []
    i = 0
    while i < len(words):
      # Longest phrase first, so "stove top oven" wins over "stove".
      for n in range(min(self._longest, len(words) - i), 1, -1):
        phrase = " ".join(words[i:i + n])
        if phrase in self._readings:
          read.append(self._readings[phrase])
          i += n
          break
      else:
        read.append(words[i])
        i += 1
    return read


@functools.cache
def coco_table() -> WordTable:
  """Rohrbach et al.'s MSCOCO table: 80 categories, their synonyms and rules."""
  text = importlib.resources.files("visionspeak_jax.evaluation").joinpath(
      _COCO_FILE).read_text(encoding="utf-8")
  return WordTable.parse(text, compounds=COCO_COMPOUNDS,
                         dropped_with=COCO_DROPPED_WITH)


def mentions(caption: str, table: WordTable) -> list[tuple[str, str]]:
  """The objects a caption names, in caption order, repeats included.

  Args:
    caption: any text; it is lowercased and split into words (module doc).
    table: the names to look for.

  Returns:
    (word or phrase, category) for each mention. The word is the table name
    as it was read: singular, and after the compounds, e.g. ("elephant",
    "elephant") for "baby elephants" and ("jet", "airplane") for "passenger
    jets", as `caption_to_words` returns its `words`.
  """
  read = table.read(caption)
  present = set(read)
  return [(word, table.names[word]) for word in read
          if word in table.names
          and table.dropped_with.get(word) not in present]


def image_objects_from(labels: Iterable[str], references: Iterable[str],
                       table: WordTable) -> set[str]:
  """An image's objects as CHAIR counts them.

  Args:
    labels: the image's instance labels, category names (or other table
      names) such as COCO's "dining table"; repeats are fine.
    references: the image's reference captions.
    table: the word table.

  Returns:
    The categories of the labels together with every category the
    references name (`get_annotations_from_segments` and
    `get_annotations_from_captions`).

  Raises:
    ValueError: if a label is not a name in the table.
  """
  objects = set()
  for label in labels:
    category = table.names.get(_normal(label))
    if category is None:
      raise ValueError(f"Label {label!r} is not a name in the word table; "
                       "pass labels of the table's categories.")
    objects.add(category)
  for reference in references:
    objects.update(category for _, category in mentions(reference, table))
  return objects


def chair(captions: Mapping[Hashable, str],
          image_objects: Mapping[Hashable, Iterable[str]],
          table: WordTable) -> dict[str, Any]:
  """CHAIR-i, CHAIR-s and coverage of one caption per image.

  Counting follows `compute_chair`: every mention counts, so a caption that
  names a missing dog twice adds two hallucinated mentions (and two
  mentions) to CHAIR-i.

  Args:
    captions: image id -> its generated caption.
    image_objects: image id -> its object categories (`image_objects_from`);
      every captioned image needs an entry.
    table: the word table.

  Returns:
    A dict with
      chair_i: hallucinated mentions / mentions, over all captions (0.0 when
        no caption names an object).
      chair_s: captions with a hallucinated mention / captions (0.0 for no
        captions).
      coverage: the mean, over images with at least one object, of
        |categories the caption names that are the image's| / |the image's
        categories|; nan when no image has an object.
      mentions, hallucinated_mentions, captions, hallucinated_captions: the
        counts behind chair_i and chair_s, so that shards can be added up.
      per_image: image id -> {"mentions": `mentions`'s list,
        "hallucinated": the (word, category) pairs among them whose category
        is not the image's, "named": the categories named, in caption order,
        "coverage": the image's share (None without objects)}.

  Raises:
    ValueError: if a captioned image has no entry in `image_objects`.
  """
  per_image = {}
  num_mentions = num_hallucinated = hallucinated_captions = 0
  coverages = []
  for image_id, caption in captions.items():
    if image_id not in image_objects:
      raise ValueError(f"Image {image_id!r} has a caption but no objects; "
                       "pass image_objects for every captioned image.")
    objects = set(image_objects[image_id])
    found = mentions(caption, table)
    hallucinated = [(w, c) for w, c in found if c not in objects]
    named = list(dict.fromkeys(c for _, c in found))
    coverage = None
    if objects:
      coverage = len(objects.intersection(named)) / len(objects)
      coverages.append(coverage)
    num_mentions += len(found)
    num_hallucinated += len(hallucinated)
    hallucinated_captions += bool(hallucinated)
    per_image[image_id] = {"mentions": found, "hallucinated": hallucinated,
                           "named": named, "coverage": coverage}
  return {
      "chair_i": num_hallucinated / num_mentions if num_mentions else 0.0,
      "chair_s": (hallucinated_captions / len(captions) if captions else 0.0),
      "coverage": (math.fsum(coverages) / len(coverages) if coverages
                   else math.nan),
      "mentions": num_mentions,
      "hallucinated_mentions": num_hallucinated,
      "captions": len(captions),
      "hallucinated_captions": hallucinated_captions,
      "per_image": per_image,
  }
