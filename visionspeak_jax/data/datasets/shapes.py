"""The built-in shapes captioning set: coloured shapes, five captions each.

Every example is drawn on the machine from a seeded numpy Generator, so the
set needs no download and regenerates byte for byte. The features mirror TFDS
`coco_captions` (`image`, `image/id`, `captions/text`, `objects/bbox`), so one
input pipeline serves both datasets.

Usage:

  import tensorflow_datasets as tfds
  # Registers `shapes_captions` with TFDS:
  import visionspeak_jax.data.datasets.shapes

  builder = tfds.builder("shapes_captions/default", data_dir=data_dir)
  builder.download_and_prepare()  # Draws the images; nothing is downloaded.
  train = builder.as_dataset(split="train")

Caption grammar (what `metrics.parse_objects` relies on): lowercase words
separated by single spaces, no punctuation, the article is always "a". Each
object is written as `a [size] colour shape`, the colour word sits between the
previous shape word and its own shape word, and no other word in a caption is
a colour or a shape. Relations between two objects use the axis on which
their centres are further apart: "to the left of", "to the right of",
"above", "below"; three objects are listed in order along the axis on which
the centres spread most ("from left to right", "from top to bottom", ...).
The words themselves are in `visionspeak_jax.data.datasets.shapes_words`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

from visionspeak_jax.data.datasets import shapes_words

# Kept here too: the builder and its users read them as `shapes.COLORS`.
COLORS = shapes_words.COLORS
SHAPES = shapes_words.SHAPES
SIZES = shapes_words.SIZES

IMAGE_SIZE = 224
NUM_CAPTIONS = 5
MAX_OBJECTS = 3

# Hues far apart so that a colour stays unambiguous after the per-object
# jitter, the background noise and a downscale to 64x64.
_RGB = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 50, 185),
    "orange": (245, 135, 20),
}
_COLOR_JITTER = 12
# Side of the square box a shape fills, in pixels at 224: small shapes are
# still about 12 px wide at 64x64, large ones about 22 px.
_EXTENT_RANGE = {"small": (40, 48), "large": (70, 82)}
_EDGE_MARGIN = 4  # Pixels between any shape and the image border.
_GAP = 8  # Pixels between the boxes of two shapes.
# How much further apart two centres must be on the relation axis than on
# the other one, so that "left of" versus "above" is never a coin toss.
_AXIS_CLEARANCE = 16
# Least distance between consecutive centres along the listing axis of three
# objects, so that "from left to right" orders them visibly.
_ORDER_CLEARANCE = 16
_MAX_LAYOUT_TRIES = 2000

# Seeds of the splits; an example is drawn from (_BASE_SEED, split, index).
_BASE_SEED = 20150210
_SPLIT_SEED = {"train": 0, "validation": 1, "test": 2}
# Image ids are unique across splits, like COCO's.
_SPLIT_ID_OFFSET = {"train": 0, "validation": 1_000_000, "test": 2_000_000}


@dataclasses.dataclass(frozen=True)
class _Object:
  color: str
  shape: str
  size: str
  x0: int  # Box in pixels; x1 and y1 are exclusive.
  y0: int
  x1: int
  y1: int

  @property
  def cx(self) -> float:
    return (self.x0 + self.x1) / 2

  @property
  def cy(self) -> float:
    return (self.y0 + self.y1) / 2

  def words(self, with_size: bool = False) -> str:
    if with_size:
      return f"{self.size} {self.color} {self.shape}"
    return f"{self.color} {self.shape}"

  def noun(self, with_size: bool = False) -> str:
    """`words` with the article English wants: "an orange circle"."""
    words = self.words(with_size)
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _relation(a: _Object, b: _Object) -> str:
  """Where `a` lies relative to `b`, on the axis of larger separation."""
  dx, dy = a.cx - b.cx, a.cy - b.cy
  if abs(dx) >= abs(dy):
    return shapes_words.LEFT_OF if dx < 0 else shapes_words.RIGHT_OF
  # Image rows grow downwards.
  return shapes_words.ABOVE if dy < 0 else shapes_words.BELOW


def _major_axis(a: _Object, b: _Object) -> int:
  """0 when `a` and `b` are further apart horizontally, 1 vertically."""
  return 0 if abs(a.cx - b.cx) >= abs(a.cy - b.cy) else 1


def _layout_ok(objects: list[_Object]) -> bool:
  """Whether boxes keep their gaps and every relation is unambiguous."""
  for i, a in enumerate(objects):
    for b in objects[i + 1:]:
      apart = (a.x1 + _GAP <= b.x0 or b.x1 + _GAP <= a.x0 or
               a.y1 + _GAP <= b.y0 or b.y1 + _GAP <= a.y0)
      if not apart:
        return False
      dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
      if abs(dx - dy) < _AXIS_CLEARANCE:
        return False
  if len(objects) == 3:
    axis = _listing_axis(objects)
    centres = sorted(o.cx if axis == 0 else o.cy for o in objects)
    if min(np.diff(centres)) < _ORDER_CLEARANCE:
      return False
    spread_x = max(o.cx for o in objects) - min(o.cx for o in objects)
    spread_y = max(o.cy for o in objects) - min(o.cy for o in objects)
    if abs(spread_x - spread_y) < _AXIS_CLEARANCE:
      return False
  return True


def _listing_axis(objects: list[_Object]) -> int:
  """0 when the centres spread more horizontally than vertically, else 1."""
  spread_x = max(o.cx for o in objects) - min(o.cx for o in objects)
  spread_y = max(o.cy for o in objects) - min(o.cy for o in objects)
  return 0 if spread_x >= spread_y else 1


def _sample_layout(rng: np.random.Generator) -> list[_Object]:
  """Draws 1-3 objects with distinct (colour, shape) and a valid layout."""
  num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
  # Distinct (colour, shape) pairs keep every caption unambiguous: "the red
  # circle" names exactly one object.
  pairs = rng.choice(len(COLORS) * len(SHAPES), size=num_objects,
                     replace=False)
  kinds = []
  for pair in pairs:
    size = SIZES[int(rng.integers(len(SIZES)))]
    low, high = _EXTENT_RANGE[size]
    extent = int(rng.integers(low, high + 1))
    kinds.append((COLORS[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)],
                  size, extent))
  for _ in range(_MAX_LAYOUT_TRIES):
    objects = []
    for color, shape, size, extent in kinds:
      x0, y0 = rng.integers(_EDGE_MARGIN, IMAGE_SIZE - _EDGE_MARGIN - extent,
                            size=2, endpoint=True)
      objects.append(_Object(color, shape, size, int(x0), int(y0),
                             int(x0) + extent, int(y0) + extent))
    if _layout_ok(objects):
      return objects
  # Unreachable in practice (three large shapes fit in a few tries), but a
  # silent infinite loop would be worse than an error.
  raise RuntimeError("Could not place the shapes; this is a bug in shapes.py.")


def _draw(rng: np.random.Generator, objects: list[_Object]) -> np.ndarray:
  """Renders the objects on a mildly noisy light grey background."""
  grey = rng.uniform(175, 235)
  tint = rng.uniform(-6, 6, size=3)
  background = np.clip(np.round(grey + tint), 0, 255).astype(np.uint8)
  canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(background))
  draw = ImageDraw.Draw(canvas)
  for o in objects:
    jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
    fill = tuple(int(v) for v in np.clip(np.add(_RGB[o.color], jitter), 0,
                                         255))
    # PIL boxes are inclusive, ours exclusive.
    x0, y0, x1, y1 = o.x0, o.y0, o.x1 - 1, o.y1 - 1
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2
    if o.shape == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
      draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "diamond":
      draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
      raise ValueError(f"Unknown shape {o.shape!r}.")
  image = np.asarray(canvas, dtype=np.int16)
  # Noise on 4x4 blocks rather than per pixel: it still makes flat colour
  # an unreliable cue, while the PNGs stay small enough to build quickly.
  noise = rng.normal(0.0, 5.0, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4, 1))
  noise = np.repeat(np.repeat(noise, 4, axis=0), 4, axis=1)
  image = image + np.round(noise).astype(np.int16)
  return np.clip(image, 0, 255).astype(np.uint8)


def _captions(objects: list[_Object]) -> list[str]:
  """Five captions that name every object and how the objects are placed."""
  if len(objects) == 1:
    (o,) = objects
    return [
        o.noun(),
        o.noun(True),
        f"there is {o.noun()} in the image",
        f"{o.noun()} on a plain background",
        f"the image shows a single {o.words(True)}",
    ]
  axis = (_major_axis(*objects) if len(objects) == 2 else
          _listing_axis(objects))
  # Sort along the axis so that the first object is the leftmost (or top).
  ordered = sorted(objects, key=lambda o: o.cx if axis == 0 else o.cy)
  if axis == 0:
    forward, backward = shapes_words.LEFT_TO_RIGHT, shapes_words.RIGHT_TO_LEFT
  else:
    forward, backward = shapes_words.TOP_TO_BOTTOM, shapes_words.BOTTOM_TO_TOP
  if len(objects) == 2:
    a, b = ordered
    return [
        f"{a.noun()} {_relation(a, b)} {b.noun()}",
        f"{b.noun(True)} {_relation(b, a)} {a.noun(True)}",
        f"{a.noun()} and {b.noun()} {forward}",
        f"there is {a.noun(True)} {_relation(a, b)} {b.noun(True)}",
        f"two shapes {backward} {b.noun()} and {a.noun()}",
    ]
  a, b, c = ordered
  return [
      f"{a.noun()} {b.noun()} and {c.noun()} {forward}",
      f"{forward} {a.noun(True)} {b.noun(True)} and {c.noun(True)}",
      (f"{a.noun()} {_relation(a, b)} {b.noun()} which is "
       f"{_relation(b, c)} {c.noun()}"),
      f"three shapes {backward} {c.noun()} {b.noun()} and {a.noun()}",
      f"{b.noun(True)} between {a.noun()} and {c.noun()}",
  ]


def generate_example(rng: np.random.Generator, image_id: int) -> dict[str, Any]:
  """Draws one image with its captions and ground-truth objects.

  The result depends only on the state of `rng`, so a Generator seeded the
  same way gives byte-identical images and identical captions.

  Args:
    rng: numpy Generator to draw from; it is advanced.
    image_id: id to store with the example.

  Returns:
    A dict with `image` (uint8 [224, 224, 3]), `image/id` (int), `captions`
    (five distinct str) and `objects`: a list of dicts with `bbox`
    (normalised (ymin, xmin, ymax, xmax) floats), `color`, `shape` and `size`
    (names from COLORS, SHAPES and SIZES).
  """
  objects = _sample_layout(rng)
  image = _draw(rng, objects)
  return {
      "image": image,
      "image/id": int(image_id),
      "captions": _captions(objects),
      "objects": [{
          "bbox": (o.y0 / IMAGE_SIZE, o.x0 / IMAGE_SIZE, o.y1 / IMAGE_SIZE,
                   o.x1 / IMAGE_SIZE),
          "color": o.color,
          "shape": o.shape,
          "size": o.size,
      } for o in objects],
  }


def example_rng(split: str, index: int) -> np.random.Generator:
  """The Generator that draws example `index` of `split`.

  Args:
    split: "train", "validation" or "test".
    index: position of the example in the split.

  Returns:
    A freshly seeded numpy Generator.
  """
  if split not in _SPLIT_SEED:
    raise ValueError(f"Unknown split {split!r}; use one of "
                     f"{sorted(_SPLIT_SEED)}.")
  return np.random.default_rng([_BASE_SEED, _SPLIT_SEED[split], index])


def example_id(split: str, index: int) -> int:
  """The `image/id` of example `index` of `split`, unique across splits."""
  return _SPLIT_ID_OFFSET[split] + index


# Examples drawn ahead of TFDS's writer: bounds the memory they hold.
_GENERATE_CHUNK = 256


def _tfds_example(split: str, index: int) -> dict[str, Any]:
  """Example `index` of `split` as `ShapesCaptions` stores it."""
  example = generate_example(example_rng(split, index),
                             example_id(split, index))
  # PIL encodes about twice as fast as the TF graph TFDS would run on a
  # numpy image; PNG is lossless, so the decoded pixels are the same.
  buffer = io.BytesIO()
  Image.fromarray(example["image"]).save(buffer, format="png",
                                         compress_level=1)
  return {
      "image": buffer.getvalue(),
      "image/id": example["image/id"],
      "captions": [{"text": text} for text in example["captions"]],
      "objects": [
          dict(o, bbox=np.asarray(o["bbox"], np.float64))
          for o in example["objects"]
      ],
  }


@dataclasses.dataclass
class ShapesCaptionsConfig(tfds.core.BuilderConfig):
  """Split sizes of a shapes_captions config.

  Example `i` of a split is the same in every config, so `tiny` is a prefix
  of `default`.
  """

  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with five captions each, drawn locally."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": ("Initial release: 1-3 shapes (4 shapes, 6 colours, 2 sizes) "
                "per 224x224 image, five captions with spatial relations."),
      "1.1.0": "Articles agree with the next word: \"an orange circle\".",
  }
  BUILDER_CONFIGS = [
      ShapesCaptionsConfig(
          name="default",
          description="10000 train, 1000 validation and 1000 test images."),
      ShapesCaptionsConfig(
          name="tiny",
          description="200 / 50 / 50 images, for tests.",
          num_train=200,
          num_validation=50,
          num_test=50),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Synthetic captioning set: 1-3 non-overlapping filled shapes "
            f"({', '.join(SHAPES)}) in {', '.join(COLORS)} and two sizes on a "
            "noisy light background, with five reference captions naming "
            "every object and their spatial relations, and ground-truth "
            "boxes. Features mirror coco_captions."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "captions": tfds.features.Sequence({
                "text": tfds.features.Text(),
            }),
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "color": tfds.features.ClassLabel(names=COLORS),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "size": tfds.features.ClassLabel(names=SIZES),
            }),
        }),
        homepage=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: every example is drawn here.
    config = self.builder_config
    return {
        "train": self._generate_examples("train", config.num_train),
        "validation": self._generate_examples("validation",
                                              config.num_validation),
        "test": self._generate_examples("test", config.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    # Each example depends only on its split and index, so threads may draw
    # and encode them in any order; they are yielded in index order. PNG
    # encoding (most of the time) releases the GIL: with two cores, TFDS's
    # serialisation of one example overlaps the drawing of the next ones.
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for start in range(0, num_examples, _GENERATE_CHUNK):
        indices = range(start, min(start + _GENERATE_CHUNK, num_examples))
        yield from zip(indices, pool.map(
            functools.partial(_tfds_example, split), indices))

