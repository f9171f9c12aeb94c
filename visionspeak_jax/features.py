"""Feature caches: a frozen ResNet's region features, written once, read often.

The original "Show, Attend and Tell" trained its decoder on pre-extracted CNN
features. `extract` runs the encoder once over the config's TFDS splits and
writes, per image, the [R, C] float16 feature map with the image id, every
reference caption and (shapes set) the objects; training in
`config.encoder_mode = "cached"` then reads them back through tf.data and
never runs the ResNet.

Layout of a cache directory:

  index.json                      what made the cache (see `extract`)
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

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from visionspeak_jax import checkpoint as checkpoint_lib
from visionspeak_jax import input_pipeline
from visionspeak_jax import model
from visionspeak_jax import pretrained
from visionspeak_jax import resnet
from visionspeak_jax import vocabulary as vocab_lib

FORMAT = "visionspeak-features/1"
INDEX = "index.json"
# Examples per TFRecord shard: ~2048 x 49 x 2048 x 2 bytes = 400 MB for COCO.
EXAMPLES_PER_SHARD = 2048


class FeatureCacheError(input_pipeline.DataError):
  """A feature cache that cannot be used, with what to do about it."""


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.feature_cache_dir`, or WORKDIR/features when it is empty."""
  return os.path.abspath(config.get("feature_cache_dir", "") or
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


def encoder_variables(config: ml_collections.ConfigDict, workdir: str
                      ) -> tuple[dict[str, Any], str]:
  """The frozen encoder's {"params", "batch_stats"} and where they came from.

  In order: `config.model.pretrained_path`; the latest checkpoint in
  WORKDIR/checkpoints; a random init if `config.extract_random_encoder`.

  Raises:
    FeatureCacheError: none of these is available, or the checkpoint's
      ResNet differs from the config's.
  """
  m = config.model
  if m.get("pretrained_path", ""):
    variables = pretrained.load_encoder(
        m.pretrained_path, m.resnet_size, num_filters=m.resnet_width,
        stem=m.resnet_stem)
    return variables, f"pretrained:{os.path.abspath(m.pretrained_path)}"
  directory = os.path.join(workdir, "checkpoints")
  if os.path.isdir(directory):
    ckpt = checkpoint_lib.Checkpointer(directory)
    try:
      step = ckpt.latest_step()
    finally:
      ckpt.close()
    if step is not None:
      return (_checkpoint_encoder(config, directory, step),
              f"checkpoint:{directory}@{step}")
  if config.get("extract_random_encoder", False):
    return (_random_encoder(config, config.seed),
            f"random:seed={config.seed}")
  raise FeatureCacheError(
      f"No encoder weights to extract features with (no checkpoint in "
      f"{directory}): set --config.model.pretrained_path, point --workdir at "
      "a trained run, or pass --config.extract_random_encoder=True.")


def _checkpoint_encoder(config: ml_collections.ConfigDict, directory: str,
                        step: int) -> dict[str, Any]:
  """The encoder variables of a run's checkpoint, if it is `config`'s ResNet.

  Raises:
    FeatureCacheError: the checkpoint holds another ResNet, or none.
  """
  # Imported here: `train` reads feature caches through this module.
  from visionspeak_jax import train  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    vocab, saved = ckpt.restore_metadata(step)
    if _encoder_description(saved) != _encoder_description(config) or (
        saved.get("encoder_mode", "end_to_end") == "cached"):
      raise FeatureCacheError(
          f"The checkpoint in {directory} holds no encoder for "
          f"{_describe(_encoder_description(config))}: extract with that "
          "run's config, or pass --config.model.pretrained_path.")
    target = jax.eval_shape(lambda: train.create_train_state(
        jax.random.key(0), saved, len(vocab)))
    state = ckpt.restore_state(target, step)
  finally:
    ckpt.close()
  return {"params": state.params["encoder"], "batch_stats": state.batch_stats}


def _random_encoder(config: ml_collections.ConfigDict,
                    seed: int) -> dict[str, Any]:
  size = config.image_size
  return model.create_encoder(config).init(
      jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False)


def cache_index(config: ml_collections.ConfigDict,
                workdir: str) -> dict[str, Any] | None:
  """The index of a run's feature cache, or None when there is none."""
  path = os.path.join(cache_dir(config, workdir), INDEX)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def extraction_encoder(config: ml_collections.ConfigDict, workdir: str,
                       index: dict[str, Any]) -> dict[str, Any]:
  """The frozen encoder that wrote a run's feature cache, rebuilt and checked.

  A "cached" run trains its decoder on these features; a "fine_tune" run
  that takes over that decoder must start its encoder from the same weights.
  They are rebuilt from the cache index's `encoder_source` (a pretrained
  file, a checkpoint or a seeded random init) and must still match its
  `encoder_fingerprint`.

  Args:
    config: that run's config (as saved in its checkpoint).
    workdir: that run's directory.
    index: `cache_index(config, workdir)`.

  Returns:
    {"params", "batch_stats"} of the encoder.

  Raises:
    FeatureCacheError: the source cannot be rebuilt, or it changed since the
      features were extracted.
  """
  directory = cache_dir(config, workdir)
  source = index["encoder_source"]
  kind, _, where = source.partition(":")
  m = config.model
  try:
    if kind == "pretrained":
      variables = pretrained.load_encoder(
          where, m.resnet_size, num_filters=m.resnet_width,
          stem=m.resnet_stem)
    elif kind == "checkpoint":
      checkpoints, _, step = where.rpartition("@")
      variables = _checkpoint_encoder(config, checkpoints, int(step))
    elif kind == "random":
      variables = _random_encoder(config, int(where.partition("=")[2]))
    else:
      raise FeatureCacheError(f"Unknown encoder_source {source!r}")
  except (pretrained.PretrainedError, checkpoint_lib.CheckpointError,
          FeatureCacheError) as e:
    raise FeatureCacheError(
        f"The encoder that extracted the features in {directory} ({source}) "
        f"cannot be rebuilt ({str(e).rstrip('.')}): pass its weights with "
        "--config.model.pretrained_path.") from e
  fingerprint = pretrained.fingerprint(variables)
  if fingerprint != index["encoder_fingerprint"]:
    raise FeatureCacheError(
        f"The encoder {source} has changed since it extracted the features "
        f"in {directory} (fingerprint {fingerprint}, "
        f"not {index['encoder_fingerprint']}): pass the original weights "
        "with --config.model.pretrained_path.")
  return variables


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


def extract(config: ml_collections.ConfigDict, workdir: str,
            process_index: int | None = None,
            process_count: int | None = None) -> str:
  """Writes this process's share of the feature cache for `config`.

  Args:
    config: the run config (dataset, splits, image size, `config.model`).
    workdir: a run whose checkpoint's encoder is used when
      `config.model.pretrained_path` is empty; also the default home of the
      cache (WORKDIR/features).
    process_index: this process (default: `jax.process_index()`).
    process_count: processes (default: `jax.process_count()`).

  Returns:
    The cache directory.
  """
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  directory = cache_dir(config, workdir)
  num_devices = input_pipeline.eval_devices(config)
  variables, source = encoder_variables(config, workdir)
  fingerprint = pretrained.fingerprint(variables)
  encoder = model.create_encoder(config)

  def encode(variables, images):
    features, _ = model.encode(encoder, {"encoder": variables["params"]},
                               variables["batch_stats"], images, train=False)
    return features.astype(jnp.float16)  # [b, R, C]; halves the transfer.

  p_encode = jax.pmap(encode, axis_name="batch", in_axes=(None, 0))
  builder = input_pipeline.get_builder(config)
  regions = model.num_regions(config)
  dim = resnet.feature_dim(config.model.resnet_size, config.model.resnet_width)
  logging.info("Extracting %s features (%d regions x %d) with %s, "
               "fingerprint %s, into %s.", config.dataset, regions, dim,
               source, fingerprint, directory)
  for split in cache_splits(config):
    out_dir = _split_dir(directory, split)
    tf.io.gfile.makedirs(out_dir)
    part_name = _part_name(process_index, process_count)
    part_path = os.path.join(out_dir, part_name)
    if tf.io.gfile.exists(part_path):
      # A stale part would make a half-rewritten split look complete.
      tf.io.gfile.remove(part_path)
    share = tfds.even_splits(split, n=process_count)[process_index]
    examples = input_pipeline.eval_examples(builder, share, config.image_size)
    shards, ids, writer, in_shard = [], [], None, 0
    for images, batch in input_pipeline.batch_eval_examples(
        examples, config.eval_batch_size):
      features = np.asarray(p_encode(
          variables, input_pipeline.shard(images, num_devices)))
      features = features.reshape((len(images),) + features.shape[2:])
      for i, ex in enumerate(batch):
        if writer is None:
          name = (f"{process_index:05d}-of-{process_count:05d}."
                  f"{len(shards):05d}.tfrecord")
          writer = tf.io.TFRecordWriter(os.path.join(out_dir, name))
          shards.append({"file": name, "num_examples": 0})
        writer.write(_example(ex.image_id, features[i], ex.references,
                              ex.objects))
        shards[-1]["num_examples"] += 1
        ids.append(ex.image_id)
        in_shard += 1
        if in_shard == EXAMPLES_PER_SHARD:
          writer.close()
          writer, in_shard = None, 0
    if writer is not None:
      writer.close()
    # Written last: its presence says the shards above are complete.
    with tf.io.gfile.GFile(part_path, "w") as f:
      json.dump({"split": split, "process": process_index,
                 "num_processes": process_count, "num_examples": len(ids),
                 "shards": shards, "image_ids": ids}, f)
    logging.info("  %s: %d images in %d shards.", split, len(ids),
                 len(shards))
  if process_index == 0:
    index = {"format": FORMAT, **_encoder_description(config),
             "num_regions": regions, "feature_dim": dim, "dtype": "float16",
             "encoder_source": source, "encoder_fingerprint": fingerprint,
             "num_processes": process_count, "splits": cache_splits(config)}
    with tf.io.gfile.GFile(os.path.join(directory, INDEX), "w") as f:
      json.dump(index, f, indent=2)
  return directory


class FeatureCache:
  """A checked, complete feature cache for a config (see `open_cache`)."""

  def __init__(self, directory: str, index: dict[str, Any],
               files: dict[str, list[str]]):
    self.directory = directory
    self.index = index
    self._files = files

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

  def captions(self, split: str) -> Iterator[str]:
    """Every reference caption of a split (for the vocabulary)."""
    ds = self._records(split).map(lambda ex: ex["captions"])
    for texts in ds.as_numpy_iterator():
      for t in texts:
        yield t.decode("utf-8")

  def train_dataset(self, config: ml_collections.ConfigDict,
                    vocab: vocab_lib.Vocabulary, *, seed: int,
                    process_index: int | None = None,
                    process_count: int | None = None) -> tf.data.Dataset:
    """An endless stream of this process's training batches of features.

    Returns:
      A dataset of dicts: `features` float16 [b, R, C] and `tokens` int32
      [b, max_caption_length + 2], b = batch_size / process_count.
    """
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
                            "texts": ex["captions"]})
    return input_pipeline.sample_captions(ds, config, vocab, seed=seed,
                                          process_count=process_count)

  def eval_examples(self, split: str, num_examples: int = -1
                    ) -> Iterator[input_pipeline.EvalExample]:
    """Evaluation examples whose `image` is the float16 [R, C] feature map."""
    ds = self._records(split)
    if num_examples > 0:
      ds = ds.take(num_examples)
    for ex in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      yield input_pipeline.EvalExample(
          image_id=int(ex["image_id"]), image=ex["features"],
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
  rerun = ("python -m visionspeak_jax.extract_features --config=... "
           "--workdir=...")
  index = cache_index(config, workdir)
  if index is None:
    raise FeatureCacheError(
        f"No feature cache in {directory}: run `{rerun}` with this config "
        "first, or point --config.feature_cache_dir at one.")
  made = {k: index.get(k) for k in _encoder_description(config)}
  wanted = _encoder_description(config)
  if index.get("format") != FORMAT or made != wanted:
    raise FeatureCacheError(
        f"The feature cache in {directory} was made for "
        f"{_describe(made)}, not {_describe(wanted)}: re-run extract_features "
        "with this config or point --config.feature_cache_dir at a matching "
        "cache.")
  if index["num_regions"] != model.num_regions(config):
    raise FeatureCacheError(
        f"The feature cache in {directory} has {index['num_regions']} regions "
        f"per image, the config's encoder gives {model.num_regions(config)}: "
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
  return FeatureCache(directory, index, files)
