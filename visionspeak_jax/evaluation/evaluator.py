"""The evaluation loop: caption a split with beam search, then score it.

Training evaluates with it periodically and at the end; `tools/evaluate.py`
runs it on a restored run. Both compile `captioner.compile_predict` from the
run's config, so the same checkpoint and settings give the same numbers.
Several processes share the work: each captions its share of the split,
process 0 scores the whole, and every process gets the same scores
(`platform/parallel.py`).
"""

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager

from absl import logging
import ml_collections
import numpy as np

from visionspeak_jax.data import input_pipeline
from visionspeak_jax.data import sources
from visionspeak_jax.evaluation import metrics as metrics_lib
from visionspeak_jax.models import captioner
from visionspeak_jax.platform import parallel
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
  """Captions a split with beam search and scores it, on every process.

  A collective: every process calls it. Each captions its share of the
  split (`parallel.share`); the captions are gathered once, process 0
  scores the whole split in its order, and every process returns those
  scores and captions, the same as one process alone would.

  The first `NUM_FIGURES` images, with their captions and attention, are
  appended to `shown` when it is given (image sources only), on every
  process.

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
  process_index, process_count = parallel.process()
  # This process's share of the split, capped first: the shares together
  # are the examples one process would caption.
  examples = source.eval_examples(split, config.num_eval_examples,
                                  process_index=process_index,
                                  process_count=process_count)
  # The split's first images, those `shown` has room for (image sources).
  num_figures = (NUM_FIGURES - len(shown)
                 if shown is not None and source.input_key == "image" else 0)
  records = []  # This process's captioned examples, in the split's order.
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
      alphas = batch_alphas[i, positions]  # [len(caption), R]
      # The split's index of this example (`parallel.share`).
      index = process_index + len(records) * process_count
      figure = (Shown(ex.inputs, caption, alphas.reshape(len(caption), *grid),
                      ex.references[0])
                if index < num_figures else None)
      records.append(_Record(ex.image_id, ex.references, caption, alphas,
                             ex.objects, figure))
  # Once: every process's records, back in the split's order.
  records = parallel.interleave(parallel.gather_objects(records))
  if num_figures > 0:
    shown.extend(r.figure for r in records[:num_figures])
  result = None
  if parallel.is_first_process():
    result = _score(records, source.has_objects, grid,
                    config.metrics_protocol)
  return parallel.broadcast_object(result)


@dataclasses.dataclass
class _Record:
  """One example captioned: what the metrics and the figures need."""
  image_id: int
  references: list[str]
  words: list[str]  # The caption.
  alphas: np.ndarray  # [len(words), R], one map per word
  objects: list[dict[str, Any]]
  figure: Shown | None  # Only for the split's first `NUM_FIGURES` images.


def _score(records: list[_Record], has_objects: bool, grid: tuple[int, int],
           protocol: str) -> Evaluation:
  """Scores the whole split's records, in the split's order (process 0)."""
  references, predictions = {}, {}
  for r in records:
    references[r.image_id] = r.references
    predictions[r.image_id] = " ".join(r.words)
  words = [r.words for r in records]
  alphas = [r.alphas for r in records]
  objects = [r.objects for r in records]
  for image_id in list(predictions)[:3]:
    logging.info("  %s: %r (reference: %r)", image_id, predictions[image_id],
                 references[image_id][0])
  results = metrics_lib.caption_metrics(references, predictions,
                                        protocol=protocol)
  results["function_word_endings"] = metrics_lib.function_word_endings(
      list(predictions.values()))
  if has_objects:
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


def shared_meteor(protocol: str) -> ContextManager[None]:
  """`metrics.shared_meteor` on process 0, which scores; elsewhere nothing.

  The other processes of a run only caption (`evaluate`): they start no JVM.
  """
  if parallel.is_first_process():
    return metrics_lib.shared_meteor(protocol)
  return contextlib.nullcontext()


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
