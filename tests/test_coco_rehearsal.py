"""Tests of the coco_rehearsal set: coco_captions/2014's spec, locally made."""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import coco
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.data.datasets import coco_rehearsal
from visionspeak_jax.text import vocabulary as vocab_lib

_COCO_SIZES = {(w, h) for w, h, _ in coco_rehearsal._IMAGE_SIZES}


def _config(data_dir):
  """configs/coco.py as it is, on the tiny rehearsal set."""
  config = coco.get_config()
  config.dataset = "coco_rehearsal/tiny"
  config.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A TfdsSource that generated `coco_rehearsal/tiny` on opening."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return input_pipeline.TfdsSource(_config(data_dir))


class _FakeDownloads:
  """Stands in for TFDS's download manager: every URL is one local folder."""

  def __init__(self, folder):
    self.folder = folder

  def download_and_extract(self, urls):
    return {key: self.folder for key in urls}

  def extract(self, path):
    return path


def test_features_and_splits_are_coco_captions(tmp_path):
  real = tfds.builder("coco_captions/2014", data_dir=str(tmp_path))
  ours = tfds.builder("coco_rehearsal/2014", data_dir=str(tmp_path))
  real_features, features = real.info.features, ours.info.features
  assert repr(features) == repr(real_features)
  assert features.get_serialized_info() == real_features.get_serialized_info()
  assert features.to_json() == real_features.to_json()
  # TFDS names COCO's labels from the annotations while building; ours are
  # those names.
  names = features["objects"]["label"].names
  assert len(names) == len(set(names)) == 80
  assert names[0] == "person" and names[-1] == "toothbrush"
  # The real split names, from coco_captions' own code: an empty Karpathy
  # split file stands in for the download.
  (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": []}))
  real_splits = [
      g.name for g in real._split_generators(_FakeDownloads(str(tmp_path)))]
  assert tuple(real_splits) == coco_rehearsal.SPLITS
  assert tuple(ours._split_generators(None)) == coco_rehearsal.SPLITS


def test_tiny_is_prepared_and_coco_like(source):
  builder = source.builder
  assert builder.is_prepared()
  sizes = builder.builder_config.split_sizes()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == sizes
  ids, caption_ids, object_ids = set(), set(), set()
  for split in coco_rehearsal.SPLITS:
    ds = builder.as_dataset(split=split,
                            decoders={"image": tfds.decode.SkipDecoding()})
    for ex in tfds.as_numpy(ds):
      image = Image.open(io.BytesIO(ex["image"]))
      assert image.format == "JPEG" and image.mode == "RGB"
      assert image.size in _COCO_SIZES
      width, height = image.size
      ids.add(ex["image/id"])
      assert ex["image/filename"].decode() == (
          f"COCO_{'train' if split == 'train' else 'val'}2014_"
          f"{ex['image/id']:012d}.jpg")
      texts = [t.decode() for t in ex["captions"]["text"]]
      assert len(texts) == 5 and len(set(texts)) == 5
      caption_ids.update(ex["captions"]["id"])
      o = ex["objects"]
      assert 1 <= len(o["label"]) <= coco_rehearsal._MAX_OBJECTS
      assert ((0 <= o["label"]) & (o["label"] < 80)).all()
      ymin, xmin, ymax, xmax = o["bbox"].T
      assert ((0 <= ymin) & (ymin < ymax) & (ymax <= 1)).all()
      assert ((0 <= xmin) & (xmin < xmax) & (xmax <= 1)).all()
      box_areas = (ymax - ymin) * height * (xmax - xmin) * width
      assert ((0 < o["area"]) & (o["area"] <= box_areas + 1)).all()
      object_ids.update(o["id"])
      # Every caption names an object, in the singular or the plural.
      names = [coco_rehearsal.CLASS_NAMES[l] for l in o["label"]]
      names += [coco_rehearsal._plural(n) for n in names]
      assert all(any(n in t.lower() for n in names) for t in texts), texts
  num_images = sum(sizes.values())
  assert len(ids) == num_images
  assert len(caption_ids) == 5 * num_images
  # Decoded through the TFDS feature, as training reads them.
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="val"))))
  assert ex["image"].dtype == np.uint8
  assert (ex["image"].shape[1], ex["image"].shape[0]) in _COCO_SIZES
  assert ex["image"].shape[2] == 3


def test_examples_are_deterministic_and_tiny_is_a_prefix(tmp_path):
  tiny = tfds.builder("coco_rehearsal/tiny", data_dir=str(tmp_path))
  full = tfds.builder("coco_rehearsal/2014", data_dir=str(tmp_path))
  tiny_splits = tiny._split_generators(None)
  full_splits = full._split_generators(None)
  for split in coco_rehearsal.SPLITS:
    for (key, ex), (full_key, full_ex) in zip(tiny_splits[split],
                                              full_splits[split]):
      assert key == full_key
      assert ex["image"] == full_ex["image"]
      assert ex["captions"] == full_ex["captions"]
      assert ex["image/id"] == full_ex["image/id"]
      assert len(ex["objects"]) == len(full_ex["objects"])
      for a, b in zip(ex["objects"], full_ex["objects"]):
        np.testing.assert_array_equal(a.pop("bbox"), b.pop("bbox"))
        assert a == b
  # The captions alone are the captions of the example, image not drawn.
  ex = coco_rehearsal.generate_example("restval", 3)
  assert [c["text"] for c in ex["captions"]] == (
      coco_rehearsal.example_captions("restval", 3))
  assert (coco_rehearsal.example_captions("train", 3) !=
          coco_rehearsal.example_captions("val", 3))


def test_full_vocabulary_is_coco_sized():
  config = coco_rehearsal.CocoRehearsal.builder_configs["2014"]
  captions = [c for split, n in [("train", config.num_train),
                                 ("restval", config.num_restval)]
              for i in range(n)
              for c in coco_rehearsal.example_captions(split, i)]
  vocab = vocab_lib.Vocabulary.build(captions, min_count=5)
  assert 8_000 <= len(vocab) <= 12_000
  lengths = np.array([len(vocab_lib.tokenize(c)) for c in captions])
  assert 9 <= lengths.mean() <= 12
  assert (lengths <= coco.get_config().max_caption_length).mean() > 0.97
  assert ((8 <= lengths) & (lengths <= 15)).mean() > 0.8


def test_tfds_source_reads_it_with_the_coco_config(source):
  config = source.config
  examples = list(source.eval_examples(config.eval_split))
  assert len(examples) == source.builder.builder_config.num_val
  for ex in examples:
    assert len(ex.references) == 5
    assert ex.inputs.shape == (config.image_size, config.image_size, 3)
    assert ex.objects == []  # Only the shapes set has colour/shape objects.
  assert len(list(source.eval_examples(config.test_split,
                                       num_examples=3))) == 3
  # The stored captions are the generator's.
  sizes = source.builder.builder_config.split_sizes()
  expected = sorted(c for split in ("train", "restval")
                    for i in range(sizes[split])
                    for c in coco_rehearsal.example_captions(split, i))
  assert sorted(source.captions(config.train_split)) == expected
  vocab = vocab_lib.Vocabulary.build(expected, min_count=1)
  batch = next(source.train_dataset(vocab, seed=0).as_numpy_iterator())
  assert batch["image"].shape == (config.batch_size, config.image_size,
                                  config.image_size, 3)
  assert batch["tokens"].shape == (config.batch_size,
                                   config.captions_per_image,
                                   config.max_caption_length + 2)
  assert os.path.isdir(os.path.join(config.data_dir, "coco_rehearsal"))
