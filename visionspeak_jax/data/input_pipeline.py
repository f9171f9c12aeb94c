"""TFDS input pipelines for the captioner (COCO captions and the shapes set).

Every dataset shares one layout: `image` (uint8), `image/id`, `captions`
(a sequence of `{"text": ...}`); the shapes set adds `objects` with boxes,
colours and shapes. `karpathy_captions` (Flickr8k, Flickr30k, COCO or your
own captions, from Karpathy's split files) has coco_captions' layout.
Training draws one reference caption per image visit, tokenises it with
TensorFlow ops, pads it and batches; evaluation keeps every reference and
the objects on the host for the metrics.

`TfdsSource` is the TFDS data source; `sample_captions`, `EvalExample` and
the batching helpers also serve the feature cache.
"""

import dataclasses
import importlib
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from visionspeak_jax import errors
from visionspeak_jax.platform import parallel
from visionspeak_jax.text import vocabulary as vocab_lib

# Datasets this package can generate itself, with the module that registers
# each; anything else must be prepared.
_LOCAL_DATASETS = {"shapes_captions": "shapes",
                   "coco_rehearsal": "coco_rehearsal",
                   "karpathy_captions": "karpathy"}


class DataError(errors.UserError):
  """A dataset that cannot be used, with a message that says what to do."""


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.dataset`, prepared if it can be generated.

  Datasets this package builds itself are prepared on first use: the shapes
  set and the COCO rehearsal are drawn, karpathy_captions reads its files
  from `config.manual_dir` (default: TFDS's <data_dir>/downloads/manual).

  Raises:
    DataError: the dataset is unknown, must be downloaded first, or its
      files cannot be used.
  """
  name = config.dataset
  local_module = _LOCAL_DATASETS.get(name.split("/")[0])
  if local_module:
    # Importing the module registers its builder with TFDS.
    importlib.import_module(f"visionspeak_jax.data.datasets.{local_module}")
  data_dir = config.data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    # ValueError: a known dataset with an unknown config.
    raise DataError(f"Unknown dataset {name!r}: set --config.dataset to "
                    "shapes_captions/default, coco_captions/2014, "
                    "coco_rehearsal/2014 or karpathy_captions/NAME (NAME: "
                    "flickr8k, flickr30k, coco or custom).") from e
  if local_module:
    # Nothing is fetched: not even TFDS's look for a prepared copy on GCS.
    download_config = tfds.download.DownloadConfig(
        manual_dir=config.manual_dir or None, try_download_gcs=False)
    # Process 0 generates first so processes sharing a filesystem do not
    # write the same files at once; hosts with their own disks then
    # generate their own (identical, deterministic) copy.
    if jax.process_index() == 0 and not builder.is_prepared():
      _prepare(builder, download_config)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"prepared {name}")
      builder = tfds.builder(name, data_dir=data_dir)
      if not builder.is_prepared():
        _prepare(builder, download_config)
  return builder


def _prepare(builder: tfds.core.DatasetBuilder,
             download_config: tfds.download.DownloadConfig) -> None:
  """`download_and_prepare`; a builder's user error becomes a DataError.

  TFDS writes into a temporary folder that it renames only on success, so a
  failed build leaves nothing prepared and the next run builds afresh.
  """
  try:
    builder.download_and_prepare(download_config=download_config)
  except errors.UserError as e:
    raise DataError(str(e)) from e


def _read_split(builder: tfds.core.DatasetBuilder, split: str, *,
                shuffle_files: bool = False, seed: int | None = None,
                skip_images: bool = False) -> tf.data.Dataset:
  """`builder.as_dataset` with a clear error when the data is missing."""
  read_config = tfds.ReadConfig(shuffle_seed=seed)
  decoders = {"image": tfds.decode.SkipDecoding()} if skip_images else None
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_files,
                              read_config=read_config, decoders=decoders)
  except (AssertionError, FileNotFoundError) as e:
    raise DataError(
        f"Dataset {builder.name} is not prepared in {builder.data_dir}: run "
        f"`tfds build {builder.name}/{builder.builder_config.name} "
        f"--data_dir=DIR` once and pass --config.data_dir=DIR."
        if builder.builder_config else
        f"Dataset {builder.name} is not prepared in {builder.data_dir}: run "
        f"`tfds build {builder.name} --data_dir=DIR` once and pass "
        "--config.data_dir=DIR.") from e
  except ValueError as e:
    raise DataError(f"Split {split!r} is not in {builder.name} (it has "
                    f"{', '.join(builder.info.splits)}): fix "
                    "--config.*_split.") from e


def _check_splits(builder: tfds.core.DatasetBuilder,
                  config: ml_collections.ConfigDict) -> None:
  """Refuses a split the dataset lacks now, not when the run first reads it.

  The final test evaluation reads `test_split` only after training: a
  dataset without it (a caption file with no test images) is better known
  before hours of steps.

  Raises:
    DataError: a configured split is not in the prepared dataset.
  """
  splits = builder.info.splits
  if not splits:
    return  # Not prepared: `_read_split` says how to prepare it.
  for field in ("train_split", "eval_split", "test_split"):
    split = config[field]
    try:
      splits[split]  # Split expressions too: "train+restval", "val[:10%]".
    except (KeyError, ValueError) as e:
      raise DataError(
          f"Split {split!r} of config.{field} is not in {config.dataset} (it "
          f"has {', '.join(splits)}): fix --config.{field}.") from e


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` with tf.data's autotuning thread off.

  That thread sleeps between optimisation rounds whose period grows to a
  minute, and destroying the iterator waits for it to wake: a run's process
  would linger for up to a minute after its final line. These pipelines are
  far faster than the steps they feed, so nothing is lost: `AUTOTUNE`
  parallelism falls back to tf.data's default, one call per core.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def make_token_table(vocab: vocab_lib.Vocabulary) -> tf.lookup.StaticHashTable:
  """A word -> id table for TensorFlow ops; unknown words map to UNK."""
  init = tf.lookup.KeyValueTensorInitializer(
      tf.constant(vocab.words), tf.range(len(vocab), dtype=tf.int64))
  return tf.lookup.StaticHashTable(init, default_value=vocab_lib.UNK_ID)


def encode_captions(texts, table, max_words: int):
  """[N] caption strings -> int32 [N, max_words + 2]: in each row BOS, the
  ids of the caption's first `max_words` words (`Vocabulary.encode`), EOS,
  then PAD."""
  ids = tf.cast(tf.ragged.map_flat_values(table.lookup,
                                          vocab_lib.tf_tokenize(texts)),
                tf.int32)[:, :max_words]
  ends = tf.ones([tf.shape(texts)[0], 1], tf.int32)
  ids = tf.concat([ends * vocab_lib.BOS_ID, ids, ends * vocab_lib.EOS_ID],
                  axis=1)
  return ids.to_tensor(default_value=vocab_lib.PAD_ID,
                       shape=[None, max_words + 2])


def resize_image(image, size: int):
  """uint8 [H, W, 3] (or [H, W, 1]) -> uint8 [size, size, 3]."""
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  image = tf.image.resize(image, (size, size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def check_batch_sizes(config: ml_collections.ConfigDict,
                      process_count: int | None = None,
                      local_devices: int | None = None) -> None:
  """The one check that both batches split evenly, defaulting to JAX's.

  A training batch is split over every device of every process, an
  evaluation batch over this process's devices.

  Raises:
    errors.ConfigError: a batch does not divide, in one sentence.
  """
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  local_devices = (jax.local_device_count() if local_devices is None
                   else local_devices)
  devices = process_count * local_devices
  if config.batch_size % devices:
    spread = (f" ({process_count} processes of {local_devices})"
              if process_count > 1 else "")
    raise errors.ConfigError(
        f"config.batch_size {config.batch_size} must be divisible by the "
        f"{devices} devices{spread}: fix --config.batch_size.")
  if config.eval_batch_size % local_devices:
    raise errors.ConfigError(
        f"config.eval_batch_size {config.eval_batch_size} must be divisible "
        f"by the {local_devices} local devices: fix "
        "--config.eval_batch_size.")


def process_share(config: ml_collections.ConfigDict,
                  process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """(this process, processes), defaulting to JAX's; checks the batch splits.

  Raises:
    errors.ConfigError: a batch does not divide (`check_batch_sizes`).
  """
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  check_batch_sizes(config, process_count)
  return process_index, process_count


def sample_captions(ds: tf.data.Dataset, config: ml_collections.ConfigDict,
                    vocab: vocab_lib.Vocabulary, *, seed: int,
                    process_count: int,
                    skip_batches: int = 0) -> tf.data.Dataset:
  """Examples with all their `texts` -> endless batches, one caption each.

  Shared by the image and the cached-feature pipelines: optional in-memory
  cache, shuffle, repeat, then a new reference caption per visit, encoded.
  The stream is a function of `seed` alone (file order, shuffle buffer and
  caption choice are all seeded, and every stage keeps its order), so a run
  resumed at step s reads exactly the batches s, s + 1, ... of the run it
  continues.

  Args:
    ds: examples; `texts` is a [N > 0] string tensor, `image_id` an int64
      scalar; the rest is kept.
    config: the run config.
    vocab: the vocabulary.
    seed: seeds shuffling and the choice of caption.
    process_count: processes sharing the global batch.
    skip_batches: batches already consumed (a resumed run's step); they are
      skipped before their captions are encoded.

  Returns:
    Batches of this process's share, with `tokens` int32
    [b, max_caption_length + 2] in place of `texts` (with
    `config.captions_per_image` K > 1: [b, K, max_caption_length + 2], K
    references of each image); for a self-critical
    run (`config.objective == "scst"`) also `image_id` int32 [b], whose
    references its rewards score against (`scst.training_references`);
    other runs drop it.
  """
  table = make_token_table(vocab)
  max_words = config.max_caption_length
  keep_id = config.objective == "scst"

  def encode_texts(ex):
    ex = dict(ex)
    ex["captions"] = encode_captions(ex.pop("texts"), table, max_words)
    image_id = ex.pop("image_id")
    if keep_id:
      # Checked, not wrapped: JAX's arrays are 32-bit.
      tf.debugging.assert_less_equal(
          image_id, tf.constant(2**31 - 1, tf.int64),
          message="image ids of a self-critical run must fit in int32")
      ex["image_id"] = tf.cast(image_id, tf.int32)
    return ex

  per_image = config.captions_per_image

  def pick_caption(index, ex):
    ex = dict(ex)
    captions = ex.pop("captions")
    visit_seed = tf.stack([tf.cast(seed, tf.int64), index])
    count = tf.shape(captions, out_type=tf.int64)[0]
    if per_image == 1:
      # A new reference per visit, reproducible from (seed, visit index).
      pick = tf.random.stateless_uniform([], seed=visit_seed, maxval=count,
                                         dtype=tf.int64)
      ex["tokens"] = captions[pick]
      return ex
    # K distinct references in a random order, as ruotianluo's loader
    # draws seq_per_img of an image's captions; an image with fewer than K
    # goes round its shuffled references again.
    order = tf.argsort(tf.random.stateless_uniform(
        tf.expand_dims(count, 0), seed=visit_seed))
    picks = tf.gather(order, tf.range(per_image, dtype=tf.int64) % count)
    ex["tokens"] = tf.gather(captions, picks)  # [K, max_caption_length + 2]
    return ex

  # Every reference is encoded once, before the cache: a visit then only
  # picks a row. The same batches, for less CPU on cores the devices keep
  # busy (a self-critical run's references are encoded too).
  ds = ds.map(encode_texts, num_parallel_calls=tf.data.AUTOTUNE)
  if config.cache_train_images:
    ds = ds.cache()
  local_batch = config.batch_size // process_count
  ds = ds.shuffle(config.shuffle_buffer_size, seed=seed).repeat()
  ds = ds.enumerate().skip(skip_batches * local_batch)
  ds = ds.map(pick_caption, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return without_autotune(ds.prefetch(tf.data.AUTOTUNE))


@dataclasses.dataclass
class EvalExample:
  """One evaluation image and what the metrics need about it."""
  image_id: int
  # The model input: an image uint8 [S, S, 3], or its features [R, C] from
  # a feature cache (the data source's `input_key` says which).
  inputs: np.ndarray
  references: list[str]
  objects: list[dict[str, Any]]  # shapes set only: bbox, color, shape


class TfdsSource:
  """Images and captions from TFDS: `config.data_source = "tfds"`.

  One of the two data sources (see `data.DataSource`); the feature cache is
  the other.
  """

  input_key = "image"  # Batches hold uint8 images [b, S, S, 3].
  run_info: dict[str, Any] = {}  # Nothing to record in checkpoints.

  def __init__(self, config: ml_collections.ConfigDict):
    """Opens (and, for the shapes set, generates) `config.dataset`.

    Raises:
      DataError: the dataset is unknown or must be downloaded first.
    """
    self.config = config
    self.builder = get_builder(config)
    _check_splits(self.builder, config)
    features = self.builder.info.features
    self.has_objects = ("objects" in features and
                        "color" in features["objects"].feature)

  @property
  def description(self) -> str:
    return f"{self.builder.name} images from {self.builder.data_dir}"

  def references(self, split: str) -> Iterator[tuple[int, list[str]]]:
    """(image id, reference captions) of each example, in the split's order."""
    ds = _read_split(self.builder, split, skip_images=True)
    ds = without_autotune(ds.map(
        lambda ex: (ex["image/id"], ex["captions"]["text"])))
    return ((int(image_id), [c.decode("utf-8") for c in texts])
            for image_id, texts in tfds.as_numpy(ds))

  def captions(self, split: str) -> Iterator[str]:
    """Every reference caption of a split (for the vocabulary)."""
    return (c for _, texts in self.references(split) for c in texts)

  def train_dataset(self, vocab: vocab_lib.Vocabulary, *, seed: int,
                    skip_batches: int = 0,
                    process_index: int | None = None,
                    process_count: int | None = None) -> tf.data.Dataset:
    """An endless, shuffled stream of this process's training batches.

    Args:
      vocab: the vocabulary.
      seed: seeds file order, shuffling and the choice of reference caption.
      skip_batches: batches a resumed run already trained on (see
        `sample_captions`).
      process_index: this process (default: `jax.process_index()`).
      process_count: processes (default: `jax.process_count()`).

    Returns:
      A dataset of dicts: `image` uint8 [b, S, S, 3] and `tokens` int32
      [b, max_caption_length + 2], with b = batch_size / process_count
      (and `image_id`, see `sample_captions`).
    """
    config = self.config
    process_index, process_count = process_share(config, process_index,
                                                 process_count)
    split = tfds.even_splits(config.train_split, n=process_count,
                             drop_remainder=True)[process_index]
    ds = _read_split(self.builder, split, shuffle_files=True, seed=seed)
    size = config.image_size

    def decode(ex):
      return {"image": resize_image(ex["image"], size),
              "texts": ex["captions"]["text"], "image_id": ex["image/id"]}

    ds = ds.filter(lambda ex: tf.size(ex["captions"]["text"]) > 0)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return sample_captions(ds, config, vocab, seed=seed,
                           process_count=process_count,
                           skip_batches=skip_batches)

  def eval_examples(self, split: str, num_examples: int = -1, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[EvalExample]:
    """Evaluation images in a fixed order, resized, with their references.

    Args:
      split: the split.
      num_examples: the first examples of the split only (-1: all).
      process_index: read only this process's share of those examples
        (round-robin, as `parallel.share`)...
      process_count: ... of this many processes; the defaults read all.

    Returns:
      The examples, in the split's order.
    """
    # Images are decoded after sharding: a process decodes only its own.
    ds = eval_share(_read_split(self.builder, split, skip_images=True),
                    num_examples, process_index, process_count)
    features = self.builder.info.features
    has_objects = self.has_objects
    if has_objects:
      color_names = features["objects"]["color"].names
      shape_names = features["objects"]["shape"].names
    image_size = self.config.image_size
    image_feature = features["image"]

    def preprocess(ex):
      image = image_feature.decode_example(ex["image"])
      out = {"image": resize_image(image, image_size),
             "id": ex["image/id"], "captions": ex["captions"]["text"]}
      if has_objects:
        out["objects"] = {k: ex["objects"][k]
                          for k in ("bbox", "color", "shape")}
      return out

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    for ex in tfds.as_numpy(without_autotune(ds.prefetch(tf.data.AUTOTUNE))):
      objects = []
      if has_objects:
        o = ex["objects"]
        objects = [{"bbox": tuple(float(v) for v in o["bbox"][i]),
                    "color": color_names[o["color"][i]],
                    "shape": shape_names[o["shape"][i]]}
                   for i in range(len(o["color"]))]
      yield EvalExample(image_id=int(ex["id"]), inputs=ex["image"],
                        references=[c.decode("utf-8")
                                    for c in ex["captions"]],
                        objects=objects)


def eval_share(ds: tf.data.Dataset, num_examples: int, process_index: int,
               process_count: int) -> tf.data.Dataset:
  """A split's first `num_examples` (-1: all), then one process's share.

  The cap comes first, so the shares together are what one process reads;
  the share is round-robin, as `parallel.share` takes it.
  """
  process_index, process_count = parallel.process(process_index,
                                                  process_count)
  if num_examples > 0:
    ds = ds.take(num_examples)
  if process_count > 1:
    ds = ds.shard(process_count, process_index)
  return ds


def batch_eval_examples(examples: Iterator[EvalExample], batch_size: int
                        ) -> Iterator[tuple[np.ndarray, list[EvalExample]]]:
  """Groups examples' inputs into full [batch_size, ...] arrays.

  The last batch is padded with copies of its first input; the returned list
  names only the real examples.
  """
  batch: list[EvalExample] = []
  for ex in examples:
    batch.append(ex)
    if len(batch) == batch_size:
      yield np.stack([e.inputs for e in batch]), batch
      batch = []
  if batch:
    inputs = [e.inputs for e in batch]
    inputs += [inputs[0]] * (batch_size - len(batch))
    yield np.stack(inputs), batch


def eval_devices(config: ml_collections.ConfigDict) -> int:
  """Local devices that share an evaluation batch; checks that it divides.

  Raises:
    errors.ConfigError: `eval_batch_size` does not divide over the local
      devices.
  """
  check_batch_sizes(config)
  return jax.local_device_count()


def shard(batch: Any, num_devices: int) -> Any:
  """[b, ...] -> [num_devices, b / num_devices, ...] for every leaf."""
  return jax.tree.map(
      lambda x: x.reshape((num_devices, -1) + x.shape[1:]), batch)
