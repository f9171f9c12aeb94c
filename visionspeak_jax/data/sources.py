"""Data sources: where a run's examples come from, behind one interface.

`config.data_source` picks one:
  "tfds": images from the TFDS dataset `config.dataset`, encoded by the
    model's ResNet (`input_pipeline.TfdsSource`);
  "feature_cache": region features written once by a frozen ResNet
    (`feature_cache.FeatureCache`, see `extract_features`); the model then
    has no encoder.

Training, evaluation and the vocabulary only use the `DataSource` methods.
"""

from typing import Any, Iterator, Protocol

import ml_collections
import tensorflow as tf

from visionspeak_jax import errors
from visionspeak_jax.data import feature_cache
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.text import vocabulary as vocab_lib

# The values of `config.data_source`.
KINDS = ("tfds", "feature_cache")


class DataSource(Protocol):
  """What training and evaluation read."""

  # The batch key of the model input: "image" (uint8 [b, S, S, 3]) or
  # "features" (float16 [b, R, C]); see `model.features`.
  input_key: str
  # JSON-able facts saved with every checkpoint (`restore.Run.info`).
  run_info: dict[str, Any]
  description: str  # For the log.
  # Examples carry the shapes set's objects (colour, shape, box): the
  # evaluation then also reports content F1 and attention grounding.
  has_objects: bool

  def references(self, split: str) -> Iterator[tuple[int, list[str]]]:
    """(image id, reference captions) of each example (self-critical
    rewards)."""

  def captions(self, split: str) -> Iterator[str]:
    """Every reference caption of a split (for the vocabulary)."""

  def train_dataset(self, vocab: vocab_lib.Vocabulary, *, seed: int,
                    skip_batches: int = 0,
                    process_index: int | None = None,
                    process_count: int | None = None) -> tf.data.Dataset:
    """Endless batches of this process's share: `input_key` and `tokens`
    (and `references` for a self-critical run, see
    `input_pipeline.sample_captions`).

    The order is a function of `seed`; a run resumed at step s passes
    `skip_batches=s` and reads what the uninterrupted run would have.
    """

  def eval_examples(self, split: str, num_examples: int = -1, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[input_pipeline.EvalExample]:
    """A split's first `num_examples` examples (-1: all) in a fixed order,
    or only the `process_index`-th of `process_count` round-robin shares of
    them (`parallel.share`): the evaluation reads its process's share."""


def create(config: ml_collections.ConfigDict, workdir: str) -> DataSource:
  """Opens the data source named by `config.data_source`.

  Raises:
    input_pipeline.DataError: the source's data is missing or unusable.
    errors.ConfigError: an unknown `data_source`.
  """
  if config.data_source == "tfds":
    return input_pipeline.TfdsSource(config)
  if config.data_source == "feature_cache":
    return feature_cache.open_cache(config, workdir)
  raise errors.ConfigError(
      f"Unknown data_source {config.data_source!r}: set --config.data_source "
      f"to one of {', '.join(KINDS)}.")
