"""A COCO-sized rehearsal set: `coco_captions/2014`'s features, made locally.

`coco_rehearsal` has exactly the features and split names of TFDS
`coco_captions/2014` (Karpathy splits: train, val, test, restval), so
`configs/coco.py` runs on it unchanged but for the dataset name:

  python -m visionspeak_jax.main --config=configs/coco.py --workdir=/tmp/r \
      --config.dataset=coco_rehearsal/2014

Training generates it on first use. To build it by hand:

  import tensorflow_datasets as tfds
  # Registers `coco_rehearsal`:
  import visionspeak_jax.data.datasets.coco_rehearsal

  tfds.builder("coco_rehearsal/2014", data_dir=data_dir).download_and_prepare()

What it rehearses is COCO's cost, not its content: JPEGs at COCO's sizes and
aspect ratios whose smooth colour fields, drawn objects and grain compress
like photos (about 150 KB each; COCO's average 160 KB), so decoding costs
what COCO's does; 1-12 boxed objects with COCO's 80 labels; and five captions
of COCO's lengths whose vocabulary at `vocab_min_count=5` is about 10k
words, like COCO's. Captions mix English function words, the objects' labels
and pseudo-words (syllable combinations) drawn with Zipf-like frequencies,
some of them tied to the main object's label so that words and pictures are
related.

Example `index` of a split is drawn from seeds of (split, index) only, so it
is the same in every config (`tiny` is a prefix of `2014`), and its captions
come from their own seed: `example_captions` gives them without drawing the
image.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
import math
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

# The 80 COCO 2014 categories in category-id order, i.e. the label names of
# a prepared coco_captions/2014. TFDS reads them from COCO's annotation files
# while building, so its source has no list to import.
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign",
    "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# Rough instances per class in COCO train2014, in thousands (in the order of
# CLASS_NAMES): person dominates, hair driers are rare.
_CLASS_WEIGHTS = (
    185, 4.9, 30, 6, 3.1, 4, 2.9, 6.7, 7.2, 9, 1.3, 1.3, 0.8, 6.5, 7.3, 2.8,
    3.4, 4.5, 6.3, 5.7, 3.5, 0.9, 3.3, 3.2, 6, 7.8, 8.7, 4.5, 4.2, 1.7, 4.7,
    1.7, 4.3, 6, 2.2, 2.4, 3.5, 4.1, 3.2, 16, 5.6, 14, 3.4, 5.4, 4.2, 10, 6,
    4, 2.9, 4.3, 5, 5.5, 2, 3.8, 5, 4.3, 27, 3.8, 5.9, 2.6, 11, 2.6, 3.8,
    3.2, 1.5, 3.8, 1.9, 4.4, 1.1, 2.3, 0.15, 3.8, 1.7, 17, 4.3, 4.6, 1,
    3, 0.13, 1.3,
)

# Karpathy's splits of coco_captions/2014, in the order its builder makes
# them.
SPLITS = ("train", "val", "test", "restval")
NUM_CAPTIONS = 5
JPEG_QUALITY = 90

# (width, height, weight): frequent COCO image sizes, landscape 640-wide ones
# most of all.
_IMAGE_SIZES = (
    (640, 480, 30), (640, 427, 22), (480, 640, 9), (427, 640, 7),
    (640, 426, 4), (640, 428, 4), (500, 375, 5), (375, 500, 3),
    (640, 360, 4), (612, 612, 3), (640, 512, 3), (640, 640, 2),
    (640, 425, 2), (640, 429, 2),
)
_MAX_SIDE = 640
_MAX_OBJECTS = 12
_MIN_BOX = 12  # Pixels; COCO has tiny boxes too, but not degenerate ones.
_SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
# Standard deviation of the grain, in grey levels: what makes a JPEG of a
# smooth picture about as large (150 KB at 640x480) as a photo's.
_GRAIN_RANGE = (16, 28)
_GRAIN_TILE = _MAX_SIDE + 128  # Grain is a random window of one fixed tile.

# Caption lengths in words (COCO's are mostly 8-15, a few run past 20).
_LENGTHS = tuple(range(7, 25))
_LENGTH_WEIGHTS = (3, 8, 20, 21, 15, 10, 7, 5, 3, 2, 1.5, 1.2, 1, 0.8, 0.6,
                   0.4, 0.3, 0.2)
_DETERMINERS = ("a", "a", "a", "a", "a", "a", "the", "the", "the", "one")
_NUMBERS = ("two", "three", "several", "many", "some")
_PREPOSITIONS = ("on", "in", "with", "next to", "near", "at", "under", "by",
                 "behind", "in front of", "on top of", "beside", "of",
                 "inside", "over", "around", "across", "along")
_LINKS = ("and", "while", "that is", "with", "as", "is")
_FUNCTION_WORDS = frozenset(
    w for phrase in _DETERMINERS + _NUMBERS + _PREPOSITIONS + _LINKS + ("an",)
    for w in phrase.split())

# Pseudo-words: syllable combinations, ranked by a fixed scramble so that
# frequent words are not alphabetical neighbours.
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p",
           "r", "s", "t", "v", "w", "z", "br", "ch", "cl", "dr", "fl", "gr",
           "pl", "pr", "sh", "sk", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "n", "r", "l", "s", "t", "m", "ck", "ng")
# Word rank r is drawn with probability proportional to (r + _ZIPF_OFFSET)
# ** -_ZIPF_EXPONENT; with probability _TOPIC_RATE the rank is shifted into
# the main label's region of the lexicon. The offset continues the power law
# of the ~150 function and label words above; the small exponent and lexicon
# make the tail flatter than COCO's, so that a few thousand images (not
# 113k) reach COCO's vocabulary size (2014: 10.3k words) and unknown-word
# rate (val: ~1%) at vocab_min_count=5.
_LEXICON_SIZE = 10_500
_ZIPF_EXPONENT = 0.5
_ZIPF_OFFSET = 150.0
_TOPIC_RATE = 0.4

_BASE_SEED = 20140101
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2, "restval": 3}
# Image ids are unique across splits; train images come from COCO's train2014,
# the other Karpathy splits from val2014.
_SPLIT_ID_OFFSET = {"train": 100_000, "restval": 300_000, "val": 400_000,
                    "test": 500_000}
_MAX_SPLIT_SIZE = 100_000
# Independent streams per example, so captions need no image drawn.
_SCENE_STREAM, _CAPTION_STREAM, _PIXEL_STREAM = range(3)


@dataclasses.dataclass(frozen=True)
class Object:
  """One drawn object; the box is in pixels, x1 and y1 exclusive."""
  label: int
  x0: int
  y0: int
  x1: int
  y1: int
  is_crowd: bool

  @property
  def shape(self) -> str:
    return _SHAPES[self.label % len(_SHAPES)]

  @property
  def area(self) -> int:
    """Pixels the drawn shape covers (COCO's area is the mask's, too)."""
    box = (self.x1 - self.x0) * (self.y1 - self.y0)
    scale = {"ellipse": math.pi / 4, "rectangle": 1.0, "triangle": 0.5,
             "diamond": 0.5}[self.shape]
    return max(1, round(box * scale))


@dataclasses.dataclass(frozen=True)
class Scene:
  """An image's size and objects; `objects[0]` is the main one."""
  width: int
  height: int
  objects: tuple[Object, ...]


def _rng(split: str, index: int, stream: int) -> np.random.Generator:
  if split not in _SPLIT_SEED:
    raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
  return np.random.default_rng([_BASE_SEED, _SPLIT_SEED[split], index, stream])


def image_id(split: str, index: int) -> int:
  """The `image/id` of example `index` of `split`, unique across splits."""
  return _SPLIT_ID_OFFSET[split] + index


def image_filename(split: str, index: int) -> str:
  """COCO's file name pattern: train2014 for train, val2014 for the rest."""
  folder = "train2014" if split == "train" else "val2014"
  return f"COCO_{folder}_{image_id(split, index):012d}.jpg"


def sample_scene(split: str, index: int) -> Scene:
  """The size and objects of example `index` of `split`."""
  rng = _rng(split, index, _SCENE_STREAM)
  weights = np.array([s[2] for s in _IMAGE_SIZES], np.float64)
  width, height, _ = _IMAGE_SIZES[rng.choice(len(weights),
                                             p=weights / weights.sum())]
  class_p = np.array(_CLASS_WEIGHTS) / sum(_CLASS_WEIGHTS)
  num_labels = 1 + int(rng.choice(4, p=[0.35, 0.3, 0.2, 0.15]))
  labels = rng.choice(len(CLASS_NAMES), size=num_labels, replace=False,
                      p=class_p)
  objects = []
  for rank, label in enumerate(labels):
    count = min(int(rng.geometric(0.4)), _MAX_OBJECTS - len(objects))
    for instance in range(count):
      # The main object is large, the rest anything from tiny to large.
      low = 0.08 if rank == instance == 0 else 0.002
      frac = math.exp(rng.uniform(math.log(low), math.log(0.5)))
      aspect = math.exp(rng.uniform(-0.7, 0.7))
      w = int(np.clip(math.sqrt(frac * width * height * aspect), _MIN_BOX,
                      width))
      h = int(np.clip(math.sqrt(frac * width * height / aspect), _MIN_BOX,
                      height))
      x0 = int(rng.integers(0, width - w + 1))
      y0 = int(rng.integers(0, height - h + 1))
      objects.append(Object(int(label), x0, y0, x0 + w, y0 + h,
                            bool(rng.random() < 0.01)))
  return Scene(width, height, tuple(objects))


def _syllable(i: int) -> str:
  return _ONSETS[i // len(_VOWELS)] + _VOWELS[i % len(_VOWELS)]


@functools.cache
def _lexicon() -> tuple[str, ...]:
  """_LEXICON_SIZE distinct pseudo-words, most frequent first."""
  syllables = len(_ONSETS) * len(_VOWELS)
  combos = syllables * syllables * len(_CODAS)
  reserved = _FUNCTION_WORDS | {
      w for n in CLASS_NAMES for w in (n + " " + _plural(n)).split()}
  words, seen = [], set()
  # 7919 is prime and does not divide `combos`, so r -> 7919 r mod combos is
  # a bijection that scatters neighbouring ranks.
  for r in range(combos):
    i = (r * 7919 + 11) % combos
    first, rest = divmod(i, syllables * len(_CODAS))
    second, coda = divmod(rest, len(_CODAS))
    word = _syllable(first) + _syllable(second) + _CODAS[coda]
    if word not in reserved and word not in seen:
      seen.add(word)
      words.append(word)
      if len(words) == _LEXICON_SIZE:
        return tuple(words)
  raise AssertionError("The syllables make too few words.")


@functools.cache
def _rank_cdf() -> np.ndarray:
  ranks = np.arange(_LEXICON_SIZE, dtype=np.float64)
  p = (ranks + _ZIPF_OFFSET) ** -_ZIPF_EXPONENT
  return np.cumsum(p / p.sum())


_IRREGULAR_PLURALS = {"person": "people", "sheep": "sheep", "skis": "skis",
                      "scissors": "scissors", "mouse": "mice",
                      "knife": "knives"}


def _plural(name: str) -> str:
  if name in _IRREGULAR_PLURALS:
    return _IRREGULAR_PLURALS[name]
  if name.endswith(("s", "sh", "ch", "x")):
    return name + "es"
  return name + "s"


class _CaptionWriter:
  """Draws the words of one example's captions."""

  def __init__(self, rng: np.random.Generator, scene: Scene):
    self.rng = rng
    self.labels = [o.label for o in scene.objects]
    self.main = self.labels[0]
    # Each label owns a region of the lexicon for its topical words.
    self.topic_shift = self.main * (_LEXICON_SIZE // len(CLASS_NAMES))

  def choice(self, options):
    return options[int(self.rng.integers(len(options)))]

  def content_word(self) -> str:
    rank = int(np.searchsorted(_rank_cdf(), self.rng.random(), side="right"))
    rank = min(rank, _LEXICON_SIZE - 1)
    if self.rng.random() < _TOPIC_RATE:
      rank = (rank + self.topic_shift) % _LEXICON_SIZE
    return _lexicon()[rank]

  def noun_phrase(self, label: int | None) -> list[str]:
    """Determiner, maybe an adjective, and a label or a pseudo-noun."""
    count = self.labels.count(label) if label is not None else 1
    if count > 1 and self.rng.random() < 0.6:
      words = [self.choice(_NUMBERS)]
      noun = _plural(CLASS_NAMES[label]).split()
    else:
      words = [self.choice(_DETERMINERS)]
      noun = (CLASS_NAMES[label] if label is not None else
              self.content_word()).split()
    if self.rng.random() < 0.5:
      words.append(self.content_word())
    words += noun
    if words[0] == "a" and words[1][0] in "aeiou":
      words[0] = "an"
    return words

  def caption(self) -> str:
    """About COCO's length; names the main object, often the others too."""
    length = int(self.rng.choice(
        _LENGTHS, p=np.array(_LENGTH_WEIGHTS) / sum(_LENGTH_WEIGHTS)))
    others = [label for label in dict.fromkeys(self.labels)
              if label != self.main]
    words = self.noun_phrase(self.main)
    while len(words) < length:
      r = self.rng.random()
      if r < 0.5:
        words.append(self.content_word())  # A verb, say.
      elif r < 0.65:
        words += self.choice(_LINKS).split()
      else:
        words += self.choice(_PREPOSITIONS).split()
      other = (others.pop(int(self.rng.integers(len(others))))
               if others and self.rng.random() < 0.5 else None)
      words += self.noun_phrase(other)
    words = words[:max(length, 3)]
    while words[-1] in _FUNCTION_WORDS:
      words.pop()  # Never end on "on the".
    text = " ".join(words)
    text = text[0].upper() + text[1:]
    # Some of COCO's raw captions end with a full stop, some do not.
    return text + "." if self.rng.random() < 0.5 else text


def example_captions(split: str, index: int,
                     scene: Scene | None = None) -> list[str]:
  """The five captions of example `index` of `split`, without its image.

  Args:
    split: one of SPLITS.
    index: position of the example in the split.
    scene: `sample_scene(split, index)`, if already drawn.

  Returns:
    NUM_CAPTIONS captions.
  """
  if scene is None:
    scene = sample_scene(split, index)
  writer = _CaptionWriter(_rng(split, index, _CAPTION_STREAM), scene)
  captions = []
  while len(captions) < NUM_CAPTIONS:
    caption = writer.caption()
    if caption not in captions:  # Five references, not four and a copy.
      captions.append(caption)
  return captions


@functools.cache
def _grain_tile() -> np.ndarray:
  """Unit gaussian grain * 32 as int8 [_GRAIN_TILE, _GRAIN_TILE, 3]."""
  noise = np.random.default_rng(_BASE_SEED).normal(
      0.0, 32.0, size=(_GRAIN_TILE, _GRAIN_TILE, 3))
  return np.clip(np.round(noise), -127, 127).astype(np.int8)


def _label_colour(label: int) -> np.ndarray:
  """A hue per label (golden-ratio steps keep neighbours apart)."""
  hue = (label * 0.618034) % 1.0
  return np.array(colorsys.hsv_to_rgb(hue, 0.65, 200.0))


def draw_image(split: str, index: int, scene: Scene) -> np.ndarray:
  """The pixels of example `index` of `split`: uint8 [height, width, 3]."""
  rng = _rng(split, index, _PIXEL_STREAM)
  w, h = scene.width, scene.height
  # Smooth colour field (lighting, sky, walls) plus mid-frequency blotches
  # (clutter); PIL resizes far faster than numpy would interpolate.
  field = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
  canvas = Image.fromarray(field).resize((w, h), Image.BICUBIC)
  blotches = rng.integers(0, 256, size=(h // 24 + 1, w // 24 + 1, 3),
                          dtype=np.uint8)
  canvas = Image.blend(canvas, Image.fromarray(blotches).resize(
      (w, h), Image.BILINEAR), 0.25)
  draw = ImageDraw.Draw(canvas)
  # Large objects first, so small ones stay visible on top of them.
  for o in sorted(scene.objects, key=lambda o: -o.area):
    jitter = rng.normal(0.0, 20.0, size=3)
    fill = tuple(int(v) for v in np.clip(_label_colour(o.label) + jitter,
                                         0, 255))
    outline = tuple(v // 2 for v in fill)
    x0, y0, x1, y1 = o.x0, o.y0, o.x1 - 1, o.y1 - 1  # PIL boxes are inclusive.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if o.shape == "ellipse":
      draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=2)
    elif o.shape == "rectangle":
      draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=2)
    elif o.shape == "triangle":
      draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill,
                   outline=outline)
    else:
      draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill,
                   outline=outline)
  ox, oy = rng.integers(0, _GRAIN_TILE - _MAX_SIDE, size=2)
  strength = int(rng.integers(_GRAIN_RANGE[0], _GRAIN_RANGE[1] + 1))
  grain = _grain_tile()[oy:oy + h, ox:ox + w].astype(np.int16)
  image = np.asarray(canvas, dtype=np.int16) + (grain * strength >> 5)
  return np.clip(image, 0, 255).astype(np.uint8)


def generate_example(split: str, index: int) -> dict[str, Any]:
  """Example `index` of `split`, ready for the TFDS features.

  Args:
    split: one of SPLITS.
    index: position of the example in the split.

  Returns:
    A dict with `image` (JPEG bytes), `image/filename`, `image/id`,
    `objects` (id, area, bbox as normalised (ymin, xmin, ymax, xmax), label
    name, is_crowd) and `captions` (id, text), as in coco_captions/2014.
  """
  scene = sample_scene(split, index)
  buffer = io.BytesIO()
  # PIL encodes faster than the TF graph TFDS would run on a numpy image.
  Image.fromarray(draw_image(split, index, scene)).save(
      buffer, format="jpeg", quality=JPEG_QUALITY)
  iid = image_id(split, index)
  w, h = scene.width, scene.height
  return {
      "image": buffer.getvalue(),
      "image/filename": image_filename(split, index),
      "image/id": iid,
      "objects": [{
          "id": iid * 100 + k,
          "area": o.area,
          "bbox": np.array([o.y0 / h, o.x0 / w, o.y1 / h, o.x1 / w],
                           np.float32),
          "label": CLASS_NAMES[o.label],
          "is_crowd": o.is_crowd,
      } for k, o in enumerate(scene.objects)],
      "captions": [{"id": iid * 10 + k, "text": text}
                   for k, text in enumerate(example_captions(split, index,
                                                             scene))],
  }


@dataclasses.dataclass
class CocoRehearsalConfig(tfds.core.BuilderConfig):
  """Split sizes of a coco_rehearsal config.

  Example `i` of a split is the same in every config, so `tiny` is a prefix
  of `2014`.
  """

  num_train: int = 0
  num_val: int = 0
  num_test: int = 0
  num_restval: int = 0

  def split_sizes(self) -> dict[str, int]:
    return {split: getattr(self, f"num_{split}") for split in SPLITS}


class CocoRehearsal(tfds.core.GeneratorBasedBuilder):
  """coco_captions/2014's features and splits, with locally drawn data."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": ("Initial release: JPEGs at COCO sizes, 1-12 objects with "
                "COCO labels, five captions with a ~10k-word vocabulary."),
  }
  BUILDER_CONFIGS = [
      CocoRehearsalConfig(
          name="2014",
          description="4000 train, 1500 restval, 250 val and 250 test images.",
          num_train=4000, num_val=250, num_test=250, num_restval=1500),
      CocoRehearsalConfig(
          name="tiny",
          description="24 / 8 / 8 / 8 images, for tests.",
          num_train=24, num_val=8, num_test=8, num_restval=8),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "2014"

  def _info(self) -> tfds.core.DatasetInfo:
    # Key for key and type for type coco_captions/2014 (object_detection/
    # coco.py and coco_captions.py in TFDS), in the same order.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Rehearsal set with the features and Karpathy split names of "
            "coco_captions/2014: COCO-sized JPEGs of drawn objects with COCO "
            "labels and boxes, five pseudo-word captions each."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "is_crowd": np.bool_,
            }),
            "captions": tfds.features.Sequence({
                "text": np.str_,
                "id": np.int64,
            }),
        }),
        homepage=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: every example is drawn here.
    sizes = self.builder_config.split_sizes()
    for split, size in sizes.items():
      if size > _MAX_SPLIT_SIZE:
        raise ValueError(f"{split} has {size} images; image ids allow at "
                         f"most {_MAX_SPLIT_SIZE} per split.")
    return {split: self._generate_examples(split, sizes[split])
            for split in SPLITS}

  def _generate_examples(self, split: str, num_examples: int):
    for index in range(num_examples):
      yield image_filename(split, index), generate_example(split, index)
