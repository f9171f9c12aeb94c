"""The evaluation loop: caption a split with beam search, then score it.

Training evaluates with it periodically and at the end; `tools/evaluate.py`
runs it on a restored run. Both compile `captioner.compile_predict` from the
run's config, so the same checkpoint and settings give the same numbers.
"""

import dataclasses
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np

from visionspeak_jax.data import input_pipeline
from visionspeak_jax.data import sources
from visionspeak_jax.evaluation import metrics as metrics_lib
from visionspeak_jax.models import captioner
from visionspeak_jax.text import vocabulary as vocab_lib

# Validation images whose attention figures are drawn at every evaluation:
# the first few of the split, the same ones every time.
NUM_FIGURES = 3


@dataclasses.dataclass
class Shown:
  """One evaluation image, captioned, for an attention figure."""
  image: np.ndarray  # uint8 [S, S, 3]
  words: list[str]
  alphas: np.ndarray  # [len(words), h, w], one map per word
  reference: str


@dataclasses.dataclass
class Evaluation:
  """A split captioned and scored."""
  metrics: dict[str, float]
  predictions: dict[int, str]  # image id -> caption, in the split's order


def evaluate(p_predict: Callable[..., Any], params: Any, batch_stats: Any,
             source: sources.DataSource, config: ml_collections.ConfigDict,
             vocab: vocab_lib.Vocabulary, split: str,
             shown: list[Shown] | None = None) -> Evaluation:
  """Captions a split with beam search and scores it.

  The first `NUM_FIGURES` images, with their captions and attention, are
  appended to `shown` when it is given (image sources only).

  Args:
    p_predict: `captioner.compile_predict(config)`.
    params: the model parameters.
    batch_stats: BatchNorm statistics.
    source: the data source of the run.
    config: the run config (`num_eval_examples`, `eval_batch_size`,
      `decode_dtype`, `metrics_protocol`).
    vocab: the run's vocabulary.
    split: the split to caption.
    shown: a list to append the figures' images to, or None.

  Returns:
    Caption metrics (BLEU-1..4, METEOR under the coco protocol, ROUGE-L,
    CIDEr, the share of captions ending on a function word), "protocol"
    (the metric protocol they were scored with, `metrics.caption_metrics`)
    and, for datasets with object annotations, content F1 and attention
    grounding; and every caption.
  """
  num_devices = input_pipeline.eval_devices(config)
  references, predictions = {}, {}
  words, alphas, objects = [], [], []
  examples = source.eval_examples(split, config.num_eval_examples)
  # Once for the whole split.
  weights = captioner.decoding_weights(params["decoder"], config.decode_dtype,
                                       captioner.decoding_attention(config))
  grid = captioner.grid(config)  # (h, w) of the attention maps
  for inputs, batch in input_pipeline.batch_eval_examples(
      examples, config.eval_batch_size):
    decoded = p_predict(params, batch_stats, weights,
                        {source.input_key: input_pipeline.shard(
                            inputs, num_devices)})
    tokens = np.asarray(decoded.tokens).reshape(len(inputs), -1)  # [B, L]
    batch_alphas = np.asarray(decoded.alphas)
    batch_alphas = batch_alphas.reshape((len(inputs),) +
                                        batch_alphas.shape[2:])  # [B, L, R]
    for i, ex in enumerate(batch):
      caption, positions = vocab.decode_with_positions(tokens[i])
      references[ex.image_id] = ex.references
      predictions[ex.image_id] = " ".join(caption)
      words.append(caption)
      alphas.append(batch_alphas[i, positions])  # [len(caption), R]
      objects.append(ex.objects)
      if (shown is not None and source.input_key == "image" and
          len(shown) < NUM_FIGURES):
        shown.append(Shown(ex.inputs, caption,
                           alphas[-1].reshape(len(caption), *grid),
                           ex.references[0]))
  for image_id in list(predictions)[:3]:
    logging.info("  %s: %r (reference: %r)", image_id, predictions[image_id],
                 references[image_id][0])
  results = metrics_lib.caption_metrics(references, predictions,
                                        protocol=config.metrics_protocol)
  results["function_word_endings"] = metrics_lib.function_word_endings(
      list(predictions.values()))
  if source.has_objects:
    results.update(metrics_lib.content_f1(
        [" ".join(w) for w in words],
        [[(o["color"], o["shape"]) for o in objs] for objs in objects]))
    results["grounding"] = metrics_lib.attention_grounding(
        words, alphas, objects, grid)
    # What a peak cell drawn at random would score on the same images.
    results["grounding_chance"] = metrics_lib.grounding_chance(
        words, objects, grid)
  results["num_images"] = len(predictions)
  return Evaluation(metrics=results, predictions=predictions)


def format_metrics(metrics: dict[str, Any]) -> str:
  """`name=value, ...`, floats to 4 decimals: the log line.

  The metric protocol comes first (`protocol=coco` or
  `protocol=regex-tokens`), where a reader comparing numbers sees it; the
  rest follow in name order.
  """
  return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in sorted(metrics.items(),
                                      key=lambda kv: (kv[0] != "protocol",
                                                      kv[0])))
