"""Feature caches: a frozen ResNet's region features, written once, read often.

The original "Show, Attend and Tell" trained its decoder on pre-extracted CNN
features. `extraction.extract` runs the encoder once over the config's TFDS
splits and writes them here with `SplitWriter` and `write_index`; a run with
`config.data_source = "feature_cache"` reads them back through
`FeatureCache`, one of the two data sources (see `data.DataSource`), and
never runs the ResNet.

Layout of a cache directory:

  index.json                      what made the cache (see `write_index`)
  <split>/part-PPPPP-of-NNNNN.json  one per process: its shards, ids, counts
  <split>/PPPPP-of-NNNNN.SSSSS.tfrecord
      tf.train.Examples: image_id int64, features bytes (float16 [R, C],
      row-major), captions bytes list, objects bytes (JSON list, may be "[]")

Each process of a multi-host run extracts its own share of every split
(`tfds.even_splits`) into its own shards and part file; a split is complete
when all `num_processes` part files are there.
"""

import json
import os
import re
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from visionspeak_jax.data import input_pipeline
from visionspeak_jax.models import captioner
from visionspeak_jax.platform import paths
from visionspeak_jax.text import vocabulary as vocab_lib

FORMAT = "visionspeak-features/2"
INDEX = "index.json"
# Examples per TFRecord shard: ~2048 x 49 x 2048 x 2 bytes = 400 MB for COCO.
EXAMPLES_PER_SHARD = 2048


class FeatureCacheError(input_pipeline.DataError):
  """A feature cache that cannot be used, with what to do about it."""


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.feature_cache_dir`, or WORKDIR/features when it is empty."""
  return paths.absolute(config.feature_cache_dir or
                             os.path.join(workdir, "features"))


def _split_dir(directory: str, split: str) -> str:
  # "train+restval" or "train[:10%]" must be one safe folder name.
  return os.path.join(directory, re.sub(r"[^A-Za-z0-9_.-]", "_", split))


def _part_name(process: int, count: int) -> str:
  return f"part-{process:05d}-of-{count:05d}.json"


def cache_splits(config: ml_collections.ConfigDict) -> list[str]:
  """The splits a cache for `config` holds: train, eval and test, once each."""
  return list(dict.fromkeys(
      [config.train_split, config.eval_split, config.test_split]))


def _encoder_description(config: ml_collections.ConfigDict) -> dict[str, Any]:
  m = config.model
  return {"dataset": config.dataset, "image_size": config.image_size,
          "resnet_size": str(m.resnet_size), "resnet_width": m.resnet_width,
          "resnet_stem": m.resnet_stem}


def _describe(d: dict[str, Any]) -> str:
  return (f"{d['dataset']} at {d['image_size']} px through ResNet-"
          f"{d['resnet_size']} (width {d['resnet_width']}, "
          f"{d['resnet_stem']} stem)")


def cache_index(config: ml_collections.ConfigDict,
                workdir: str) -> dict[str, Any] | None:
  """The index of a run's feature cache, or None when there is none."""
  path = os.path.join(cache_dir(config, workdir), INDEX)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _example(image_id: int, features: np.ndarray, references: list[str],
             objects: list[dict[str, Any]]) -> bytes:
  feature = {
      "image_id": tf.train.Feature(int64_list=tf.train.Int64List(
          value=[image_id])),
      "features": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[features.astype(np.float16).tobytes()])),
      "captions": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[r.encode("utf-8") for r in references])),
      "objects": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[json.dumps(objects).encode("utf-8")])),
  }
  return tf.train.Example(
      features=tf.train.Features(feature=feature)).SerializeToString()


class SplitWriter:
  """Writes one process's share of a split: TFRecord shards, then its part.

  Use as a context manager; the part file, written on a clean exit, marks
  the share complete.
  """

  def __init__(self, directory: str, split: str, process_index: int,
               process_count: int):
    self._dir = _split_dir(directory, split)
    self._split = split
    self._process = (process_index, process_count)
    self._part = os.path.join(self._dir, _part_name(process_index,
                                                    process_count))
    self._shards: list[dict[str, Any]] = []
    self.image_ids: list[int] = []
    self._writer = None
    self._in_shard = 0

  def __enter__(self) -> "SplitWriter":
    tf.io.gfile.makedirs(self._dir)
    if tf.io.gfile.exists(self._part):
      # A stale part would make a half-rewritten split look complete.
      tf.io.gfile.remove(self._part)
    return self

  def write(self, image_id: int, features: np.ndarray, references: list[str],
            objects: list[dict[str, Any]]) -> None:
    """Adds one image: its [R, C] features, references and objects."""
    if self._writer is None:
      index, count = self._process
      name = f"{index:05d}-of-{count:05d}.{len(self._shards):05d}.tfrecord"
      self._writer = tf.io.TFRecordWriter(os.path.join(self._dir, name))
      self._shards.append({"file": name, "num_examples": 0})
    self._writer.write(_example(image_id, features, references, objects))
    self._shards[-1]["num_examples"] += 1
    self.image_ids.append(image_id)
    self._in_shard += 1
    if self._in_shard == EXAMPLES_PER_SHARD:
      self._writer.close()
      self._writer, self._in_shard = None, 0

  @property
  def num_shards(self) -> int:
    return len(self._shards)

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._writer is not None:
      self._writer.close()
    if exc_type is not None:
      return
    index, count = self._process
    # Written last: its presence says the shards above are complete.
    with tf.io.gfile.GFile(self._part, "w") as f:
      json.dump({"split": self._split, "process": index,
                 "num_processes": count, "num_examples": len(self.image_ids),
                 "shards": self._shards, "image_ids": self.image_ids}, f)


def write_index(directory: str, config: ml_collections.ConfigDict, *,
                feature_dim: int, encoder_source: str,
                encoder_fingerprint: str, num_processes: int,
                has_objects: bool) -> None:
  """Writes index.json: what made the cache, for `open_cache` to check.

  `has_objects`: the examples carry the shapes set's objects (see
  `data.DataSource.has_objects`).
  """
  index = {"format": FORMAT, **_encoder_description(config),
           "num_regions": captioner.num_regions(config),
           "feature_dim": feature_dim, "dtype": "float16",
           "has_objects": has_objects,
           "encoder_source": encoder_source,
           "encoder_fingerprint": encoder_fingerprint,
           "num_processes": num_processes, "splits": cache_splits(config)}
  with tf.io.gfile.GFile(os.path.join(directory, INDEX), "w") as f:
    json.dump(index, f, indent=2)


class FeatureCache:
  """A checked, complete feature cache for a config (see `open_cache`).

  The data source of `config.data_source = "feature_cache"` (see
  `data.DataSource`): batches hold features, not images.
  """

  input_key = "features"  # Batches hold float16 features [b, R, C].

  def __init__(self, config: ml_collections.ConfigDict, directory: str,
               index: dict[str, Any], files: dict[str, list[str]]):
    self.config = config
    self.directory = directory
    self.index = index
    self._files = files

  @property
  def description(self) -> str:
    return (f"features cached in {self.directory} (encoder "
            f"{self.index['encoder_source']})")

  @property
  def run_info(self) -> dict[str, Any]:
    """The encoder the features came from, to be saved with the run.

    A run that takes over this run's decoder (`config.init_from`) must
    start its encoder from the same weights (see `restore.initial_weights`).
    """
    return {"encoder_source": self.index["encoder_source"],
            "encoder_fingerprint": self.index["encoder_fingerprint"]}

  @property
  def has_objects(self) -> bool:
    return self.index["has_objects"]

  @property
  def num_regions(self) -> int:
    return self.index["num_regions"]

  @property
  def feature_dim(self) -> int:
    return self.index["feature_dim"]

  def files(self, split: str) -> list[str]:
    """The split's TFRecord shards, in extraction order."""
    return list(self._files[split])

  def _records(self, split: str, files: list[str] | None = None
               ) -> tf.data.Dataset:
    r, c = self.num_regions, self.feature_dim
    spec = {
        "image_id": tf.io.FixedLenFeature([], tf.int64),
        "features": tf.io.FixedLenFeature([], tf.string),
        "captions": tf.io.VarLenFeature(tf.string),
        "objects": tf.io.FixedLenFeature([], tf.string, default_value="[]"),
    }

    def parse(record):
      ex = tf.io.parse_single_example(record, spec)
      features = tf.reshape(tf.io.decode_raw(ex["features"], tf.float16),
                            [r, c])
      return {"image_id": ex["image_id"], "features": features,
              "captions": tf.sparse.to_dense(ex["captions"]),
              "objects": ex["objects"]}

    ds = tf.data.TFRecordDataset(files if files is not None
                                 else self.files(split))
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

  def references(self, split: str) -> Iterator[tuple[int, list[str]]]:
    """(image id, reference captions) of each example, in the cache's order."""
    ds = input_pipeline.without_autotune(
        self._records(split).map(lambda ex: (ex["image_id"], ex["captions"])))
    for image_id, texts in ds.as_numpy_iterator():
      yield int(image_id), [t.decode("utf-8") for t in texts]

  def captions(self, split: str) -> Iterator[str]:
    """Every reference caption of a split (for the vocabulary)."""
    return (c for _, texts in self.references(split) for c in texts)

  def train_dataset(self, vocab: vocab_lib.Vocabulary, *, seed: int,
                    skip_batches: int = 0,
                    process_index: int | None = None,
                    process_count: int | None = None) -> tf.data.Dataset:
    """An endless stream of this process's training batches of features.

    Args:
      vocab: the vocabulary.
      seed: seeds shuffling and the choice of reference caption.
      skip_batches: batches a resumed run already trained on.
      process_index: this process (default: `jax.process_index()`).
      process_count: processes (default: `jax.process_count()`).

    Returns:
      A dataset of dicts: `features` float16 [b, R, C] and `tokens` int32
      [b, max_caption_length + 2], b = batch_size / process_count.
    """
    config = self.config
    process_index, process_count = input_pipeline.process_share(
        config, process_index, process_count)
    files = self.files(config.train_split)
    if len(files) >= process_count:
      # Whole shards per process: nobody reads records it then drops.
      ds = self._records(None, files[process_index::process_count])
    else:
      ds = self._records(None, files).shard(process_count, process_index)
    ds = ds.filter(lambda ex: tf.size(ex["captions"]) > 0)
    ds = ds.map(lambda ex: {"features": ex["features"],
                            "texts": ex["captions"],
                            "image_id": ex["image_id"]})
    return input_pipeline.sample_captions(ds, config, vocab, seed=seed,
                                          process_count=process_count,
                                          skip_batches=skip_batches)

  def eval_examples(self, split: str, num_examples: int = -1, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[input_pipeline.EvalExample]:
    """`sources.DataSource.eval_examples`, `inputs` float16 [R, C] features.

    The defaults read the whole split (`input_pipeline.eval_share`).
    """
    ds = input_pipeline.eval_share(self._records(split), num_examples,
                                   process_index, process_count)
    ds = input_pipeline.without_autotune(ds.prefetch(tf.data.AUTOTUNE))
    for ex in ds.as_numpy_iterator():
      yield input_pipeline.EvalExample(
          image_id=int(ex["image_id"]), inputs=ex["features"],
          references=[c.decode("utf-8") for c in ex["captions"]],
          objects=[{**o, "bbox": tuple(o["bbox"])}
                   for o in json.loads(ex["objects"])])


def open_cache(config: ml_collections.ConfigDict, workdir: str,
               splits: list[str] | None = None) -> FeatureCache:
  """Opens the feature cache of `config` and checks it can serve the run.

  Args:
    config: the run config.
    workdir: the run directory (the cache defaults to WORKDIR/features).
    splits: splits that must be complete (default: train, eval and test).

  Raises:
    FeatureCacheError: the cache is missing, incomplete, or was made for
      another dataset, image size or ResNet.
  """
  directory = cache_dir(config, workdir)
  rerun = ("python -m visionspeak_jax.tools.extract_features --config=... "
           "--workdir=...")
  index = cache_index(config, workdir)
  if index is None:
    raise FeatureCacheError(
        f"No feature cache in {directory}: run `{rerun}` with this config "
        "first, or point --config.feature_cache_dir at one.")
  if index.get("format") != FORMAT:
    raise FeatureCacheError(
        f"The feature cache in {directory} is in format "
        f"{index.get('format')!r}, this version reads {FORMAT!r}: re-run "
        f"`{rerun}` with this config.")
  made = {k: index.get(k) for k in _encoder_description(config)}
  wanted = _encoder_description(config)
  if made != wanted:
    raise FeatureCacheError(
        f"The feature cache in {directory} was made for "
        f"{_describe(made)}, not {_describe(wanted)}: re-run extract_features "
        "with this config or point --config.feature_cache_dir at a matching "
        "cache.")
  if index["num_regions"] != captioner.num_regions(config):
    raise FeatureCacheError(
        f"The feature cache in {directory} has {index['num_regions']} regions "
        f"per image, the config's encoder gives "
        f"{captioner.num_regions(config)}: "
        "re-run extract_features with this config.")
  files = {}
  for split in splits if splits is not None else cache_splits(config):
    split_dir = _split_dir(directory, split)
    count = index["num_processes"]
    missing, split_files = [], []
    for p in range(count):
      part = os.path.join(split_dir, _part_name(p, count))
      if not tf.io.gfile.exists(part):
        missing.append(part)
        continue
      with tf.io.gfile.GFile(part) as f:
        shards = json.load(f)["shards"]
      for shard in shards:
        name = os.path.join(split_dir, shard["file"])
        (split_files if tf.io.gfile.exists(name) else missing).append(name)
    if missing:
      raise FeatureCacheError(
          f"The feature cache in {directory} is incomplete for split "
          f"{split!r} ({len(missing)} files missing, e.g. {missing[0]}): "
          f"re-run `{rerun}` with this config (on every process of a "
          "multi-host run).")
    files[split] = split_files
  return FeatureCache(config, directory, index, files)
