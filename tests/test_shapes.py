"""Tests of the shapes captioning set: drawing, captions, TFDS builder."""

import collections
import itertools
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from visionspeak_jax.data.datasets import shapes
from visionspeak_jax.evaluation import metrics

_NUM_CHECKED = 300


@pytest.fixture(scope="module")
def examples():
  return [
      shapes.generate_example(shapes.example_rng("train", i), i)
      for i in range(_NUM_CHECKED)
  ]


def _centre(obj):
  ymin, xmin, ymax, xmax = obj["bbox"]
  return (xmin + xmax) / 2, (ymin + ymax) / 2


def _expected_relation(a, b):
  """Where a lies relative to b, on the axis of larger centre separation."""
  (ax, ay), (bx, by) = _centre(a), _centre(b)
  if abs(ax - bx) >= abs(ay - by):
    return "to the left of" if ax < bx else "to the right of"
  return "above" if ay < by else "below"


def _find(objects, color, shape):
  (match,) = [o for o in objects if (o["color"], o["shape"]) == (color, shape)]
  return match


def test_generation_is_deterministic():
  for split, index in [("train", 0), ("train", 17), ("test", 3)]:
    first = shapes.generate_example(shapes.example_rng(split, index), 5)
    second = shapes.generate_example(shapes.example_rng(split, index), 5)
    assert first["image"].tobytes() == second["image"].tobytes()
    assert first["captions"] == second["captions"]
    assert first["objects"] == second["objects"]
  other = shapes.generate_example(shapes.example_rng("validation", 0), 5)
  assert other["image"].tobytes() != first["image"].tobytes()


def test_image_and_object_fields(examples):
  counts = collections.Counter(len(e["objects"]) for e in examples)
  assert set(counts) == {1, 2, 3}
  for e in examples:
    assert e["image"].shape == (224, 224, 3)
    assert e["image"].dtype == np.uint8
    for o in e["objects"]:
      assert o["color"] in shapes.COLORS
      assert o["shape"] in shapes.SHAPES
      assert o["size"] in shapes.SIZES
  seen = {(o["color"], o["shape"], o["size"])
          for e in examples for o in e["objects"]}
  assert len(seen) == len(shapes.COLORS) * len(shapes.SHAPES) * len(
      shapes.SIZES)


def test_boxes_inside_and_apart(examples):
  size, margin, gap = shapes.IMAGE_SIZE, shapes._EDGE_MARGIN, shapes._GAP
  for e in examples:
    # In whole pixels, the unit the layout keeps its margins in.
    boxes = [np.rint(np.asarray(o["bbox"]) * size) for o in e["objects"]]
    for ymin, xmin, ymax, xmax in boxes:
      assert margin <= ymin < ymax <= size - margin, e["captions"][0]
      assert margin <= xmin < xmax <= size - margin, e["captions"][0]
    for a, b in itertools.combinations(boxes, 2):
      apart = (a[3] + gap <= b[1] or b[3] + gap <= a[1] or
               a[2] + gap <= b[0] or b[2] + gap <= a[0])
      assert apart, e["captions"][0]


def test_pixels_match_objects(examples):
  """The centre of every box shows the annotated colour, not another one."""
  palette = np.array([shapes._RGB[c] for c in shapes.COLORS], np.float64)
  for e in examples[:100]:
    for o in e["objects"]:
      x, y = (int(v * 224) for v in _centre(o))
      patch = e["image"][y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
      nearest = np.argmin(((palette - patch)**2).sum(-1))
      assert shapes.COLORS[nearest] == o["color"]


def test_caption_format(examples):
  for e in examples:
    captions = e["captions"]
    assert len(captions) == 5 and len(set(captions)) == 5
    for caption in captions:
      assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
      assert len(caption.split()) <= 20, caption
      words = caption.split()
      for article, word in zip(words, words[1:]):
        # English articles: "an orange circle", "a large ...", never "a o...".
        if article in ("a", "an"):
          assert (article == "an") == (word[0] in "aeiou"), caption


def test_orange_takes_an(examples):
  oranges = [c for e in examples for c in e["captions"] if "orange" in c]
  assert oranges and any("an orange" in c for c in oranges)
  assert not any("a orange" in c for c in oranges)


def test_every_caption_names_every_object(examples):
  for e in examples:
    truth = collections.Counter((o["color"], o["shape"]) for o in e["objects"])
    for caption in e["captions"]:
      assert collections.Counter(metrics.parse_objects(caption)) == truth, (
          caption)


def test_size_words_match(examples):
  for e in examples:
    for caption in e["captions"]:
      words = caption.split()
      for t, word in enumerate(words):
        if word in shapes.SIZES:
          obj = _find(e["objects"], words[t + 1], words[t + 2])
          assert obj["size"] == word, caption


def test_two_object_relations(examples):
  two = [e for e in examples if len(e["objects"]) == 2]
  assert len(two) > 50
  relations = set()
  pattern = re.compile(
      r"(?:there is )?an? (?:(?:small|large) )?(\w+) (\w+) "
      r"(to the left of|to the right of|above|below) "
      r"an? (?:(?:small|large) )?(\w+) (\w+)")
  for e in two:
    with_relation = [c for c in e["captions"] if pattern.fullmatch(c)]
    assert len(with_relation) == 3, e["captions"]
    for caption in with_relation:
      c1, s1, relation, c2, s2 = pattern.fullmatch(caption).groups()
      first = _find(e["objects"], c1, s1)
      second = _find(e["objects"], c2, s2)
      assert relation == _expected_relation(first, second), caption
      relations.add(relation)
  assert relations == {"to the left of", "to the right of", "above", "below"}


def test_three_object_order(examples):
  three = [e for e in examples if len(e["objects"]) == 3]
  assert len(three) > 50
  for e in three:
    caption = e["captions"][0]
    named = [_find(e["objects"], c, s) for c, s in metrics.parse_objects(caption)]
    xs = [_centre(o)[0] for o in named]
    ys = [_centre(o)[1] for o in named]
    if caption.endswith("from left to right"):
      assert xs == sorted(xs), caption
    else:
      assert caption.endswith("from top to bottom"), caption
      assert ys == sorted(ys), caption
    # The relation clauses name each neighbour pair correctly.
    pattern = re.compile(r"an? (\w+) (\w+) (to the left of|to the right of|"
                         r"above|below) an? (\w+) (\w+) which is (to the "
                         r"left of|to the right of|above|below) an? (\w+) "
                         r"(\w+)")
    c1, s1, r12, c2, s2, r23, c3, s3 = pattern.fullmatch(
        e["captions"][2]).groups()
    a, b, c = (_find(e["objects"], *k) for k in [(c1, s1), (c2, s2), (c3, s3)])
    assert r12 == _expected_relation(a, b)
    assert r23 == _expected_relation(b, c)


def test_tiny_builder(tmp_path):
  builder = tfds.builder("shapes_captions/tiny", data_dir=str(tmp_path))
  builder.download_and_prepare()
  splits = builder.info.splits
  assert (splits["train"].num_examples, splits["validation"].num_examples,
          splits["test"].num_examples) == (200, 50, 50)
  assert builder.info.features["objects"]["color"].names == shapes.COLORS
  ds = builder.as_dataset(split="validation")
  ids = set()
  for example in tfds.as_numpy(ds):
    ids.add(int(example["image/id"]))
    assert example["image"].shape == (224, 224, 3)
    assert example["image"].dtype == np.uint8
    assert example["captions"]["text"].shape == (5,)
    num_objects = example["objects"]["bbox"].shape[0]
    assert example["objects"]["bbox"].shape == (num_objects, 4)
    index = int(example["image/id"]) - 1_000_000
    drawn = shapes.generate_example(shapes.example_rng("validation", index), 0)
    assert num_objects == len(drawn["objects"])
  assert len(ids) == 50
  # The stored image is the lossless copy of the generated one.
  (stored,) = tfds.as_numpy(ds.filter(lambda e: e["image/id"] == 1_000_003))
  fresh = shapes.generate_example(shapes.example_rng("validation", 3), 0)
  np.testing.assert_array_equal(stored["image"], fresh["image"])
  assert [t.decode() for t in stored["captions"]["text"]] == fresh["captions"]
  np.testing.assert_allclose(stored["objects"]["bbox"],
                             [o["bbox"] for o in fresh["objects"]], atol=1e-6)
  assert [shapes.SHAPES[i] for i in stored["objects"]["shape"]] == [
      o["shape"] for o in fresh["objects"]]


def test_threaded_generation_yields_every_example_in_order(monkeypatch):
  # Threads draw and encode the examples; TFDS must still get each index
  # once, in order, with the example that index alone determines. Chunks of
  # 4 make 10 examples cross two chunk boundaries.
  monkeypatch.setattr(shapes, "_GENERATE_CHUNK", 4)
  builder = shapes.ShapesCaptions(config="tiny")
  # pylint: disable=protected-access
  yielded = list(builder._generate_examples("validation", 10))
  assert [index for index, _ in yielded] == list(range(10))
  for index, example in yielded:
    alone = shapes._tfds_example("validation", index)
    assert example["image"] == alone["image"]
    assert example["image/id"] == alone["image/id"]
    assert example["captions"] == alone["captions"]
  # pylint: enable=protected-access
