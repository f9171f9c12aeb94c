"""Runs a frozen ResNet once over the config's splits into a feature cache.

The encoder comes from `restore.extraction_encoder` (a weights file, a
run's checkpoint, or a seeded random init); the cache format belongs to
`feature_cache`.
"""

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from visionspeak_jax.data import feature_cache
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.models import captioner
from visionspeak_jax.models import pretrained
from visionspeak_jax.models import resnet
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore


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

  Raises:
    errors.UserError: a config, data, checkpoint or weights problem, in one
      sentence.
  """
  config_checks.validate(config)
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  directory = feature_cache.cache_dir(config, workdir)
  num_devices = input_pipeline.eval_devices(config)
  variables, source = restore.extraction_encoder(config, workdir)
  fingerprint = pretrained.fingerprint(variables)
  encoder = captioner.create_encoder(config)
  grid_hw = captioner.grid(config)

  def encode(variables, images):
    features, _ = captioner.encode_images(
        encoder, {"encoder": variables["params"]}, variables["batch_stats"],
        images, train=False, grid_hw=grid_hw)
    return features.astype(jnp.float16)  # [b, R, C]; halves the transfer.

  p_encode = jax.pmap(encode, axis_name="batch", in_axes=(None, 0))
  source_data = input_pipeline.TfdsSource(config)
  dim = resnet.feature_dim(config.model.resnet_size, config.model.resnet_width)
  logging.info("Extracting %s features (%d regions x %d) with %s, "
               "fingerprint %s, into %s.", config.dataset,
               captioner.num_regions(config), dim, source, fingerprint,
               directory)
  for split in feature_cache.cache_splits(config):
    share = tfds.even_splits(split, n=process_count)[process_index]
    examples = source_data.eval_examples(share)
    with feature_cache.SplitWriter(directory, split, process_index,
                                   process_count) as writer:
      for images, batch in input_pipeline.batch_eval_examples(
          examples, config.eval_batch_size):
        features = np.asarray(p_encode(
            variables, input_pipeline.shard(images, num_devices)))
        features = features.reshape((len(images),) + features.shape[2:])
        for i, ex in enumerate(batch):
          writer.write(ex.image_id, features[i], ex.references, ex.objects)
    logging.info("  %s: %d images in %d shards.", split,
                 len(writer.image_ids), writer.num_shards)
  if process_index == 0:
    feature_cache.write_index(directory, config, feature_dim=dim,
                              encoder_source=source,
                              encoder_fingerprint=fingerprint,
                              num_processes=process_count,
                              has_objects=source_data.has_objects)
  return directory
