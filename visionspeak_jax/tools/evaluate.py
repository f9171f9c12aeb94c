r"""Scores a trained run on a split, as the anchors' eval.py scripts do.

  python -m visionspeak_jax.tools.evaluate --workdir=RUN [--best] \
      [--step=N] [--split=test] [--beam_size=5] [--length_penalty=0.0] \
      [--suppress_unk] [--block_trigrams] [--min_length=N] \
      [--num_examples=N] [--decode_dtype=bfloat16] [--data_dir=DIR] \
      [--manual_dir=DIR] [--hard_attention_decoding=hard] \
      [--metrics_protocol=coco]

Restores the run (its newest checkpoint, `--step`, or with `--best` the top
one by the evaluation metric), captions the split with beam search and
prints one line: the metric protocol (`protocol=coco` or
`protocol=regex-tokens`, see `evaluation/metrics.py`), the metrics the
training run logs, then what ruotianluo/self-critical's evaluation adds
(mean caption length, distinct words, the share of novel captions, i.e. not
verbatim a training reference, and the share ending on one of its
`bad_endings`).

Writes, in RUN/eval/:
  - `<split>_step<N>_beam<K>.json`: the captions in the COCO results format,
    `[{"image_id": ..., "caption": ...}]`, which pycocotools' `COCO.loadRes`
    reads. It is not a submission to the COCO caption evaluation server,
    which takes captions for all 40,504 val2014 or all 40,775 test2014
    images, where Karpathy's test split is 5,000 of val2014's images;
  - `<split>_step<N>_beam<K>_scores.json`: the metrics, with the protocol
    they were scored under in `metrics["protocol"]`, and the settings.

Every setting defaults to the run's own config, so a run evaluated with its
own settings prints its final line again. The run may be training meanwhile:
checkpoints are only read.
"""

from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections

from visionspeak_jax.data import sources
from visionspeak_jax.evaluation import evaluator
from visionspeak_jax.evaluation import metrics as metrics_lib
from visionspeak_jax.models import captioner
from visionspeak_jax.platform import parallel
from visionspeak_jax.platform import paths
from visionspeak_jax.platform import runtime
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore

# Flags that override the run's config field of the same name (None: keep).
_OVERRIDES = ("beam_size", "length_penalty", "suppress_unk",
              "block_trigrams", "min_length", "decode_dtype", "data_dir",
              "manual_dir", "hard_attention_decoding", "metrics_protocol")


def settings(config: ml_collections.ConfigDict, *, split: str | None = None,
             num_examples: int | None = None,
             **overrides: Any) -> ml_collections.ConfigDict:
  """The run's config with the evaluation's settings; the run's are kept.

  Args:
    config: the run's config.
    split: the split to score; None keeps `config.test_split`.
    num_examples: images to score at most (-1 all); None keeps the run's
      `num_eval_examples`.
    **overrides: `_OVERRIDES` fields; None keeps the run's value.

  Returns:
    A new config whose `test_split` is the split to score.

  Raises:
    errors.ConfigError: a setting out of range, in one sentence.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for name, value in overrides.items():
    if name not in _OVERRIDES:
      raise TypeError(f"Unknown setting {name!r}.")
    if value is None:
      continue
    if name == "hard_attention_decoding":  # A field of a sub-config.
      config.hard_attention.decoding = value
    else:
      config[name] = value
  if split is not None:
    config.test_split = split
  if num_examples is not None:
    config.num_eval_examples = num_examples
  config_checks.validate(config)
  # As training does: a run trained without Java scores without it here
  # too, unless --metrics_protocol says otherwise.
  config.metrics_protocol = metrics_lib.resolve_protocol(
      config.metrics_protocol)
  return config


def output_stem(workdir: str, split: str, step: int, beam_size: int) -> str:
  """RUN/eval/<split>_step<N>_beam<K>, the results' path without `.json`."""
  name = f"{split.replace('/', '_')}_step{step}_beam{beam_size}"
  return os.path.join(paths.absolute(workdir), "eval", name)


def evaluate_run(workdir: str, *, best: bool = False,
                 step: int | None = None, split: str | None = None,
                 num_examples: int | None = None,
                 **overrides: Any) -> dict[str, Any]:
  """Restores a run, scores a split, writes the captions and the scores.

  Under several processes every process calls it and captions its share
  (`evaluator.evaluate`); process 0 writes the files, all return the report.

  Args:
    workdir: the training run's directory.
    best: read `best/` instead of `checkpoints/`.
    step: the checkpoint step; default the newest intact one.
    split: the split; default the run's `test_split`.
    num_examples: images to score at most; default the run's setting.
    **overrides: decoding and data settings (`_OVERRIDES`); default the
      run's.

  Returns:
    The scores JSON's content: `metrics`, `settings`, `checkpoint`, `step`,
    `captions` (the results file).

  Raises:
    errors.UserError: no usable checkpoint, bad settings or missing data,
      in one sentence.
  """
  run = restore.restore_run(workdir, step=step, best=best)
  config = settings(run.config, split=split, num_examples=num_examples,
                    **overrides)
  source = sources.create(config, workdir)
  logging.info("Data: %s; scoring %s of step %d.", source.description,
               config.test_split, run.step)
  p_predict = captioner.compile_predict(config)
  with evaluator.shared_meteor(config.metrics_protocol):
    result = evaluator.evaluate(p_predict, run.params, run.batch_stats,
                                source, config, run.vocab, config.test_split)
  scores = None
  if parallel.is_first_process():  # Scored once; every process returns it.
    scores = dict(result.metrics)
    scores.update(metrics_lib.caption_statistics(
        list(result.predictions.values()),
        source.captions(config.train_split)))
  scores = parallel.broadcast_object(scores)
  stem = output_stem(workdir, config.test_split, run.step, config.beam_size)
  captions = [{"image_id": int(image_id), "caption": caption}
              for image_id, caption in result.predictions.items()]
  report = {
      "checkpoint": run.directory,
      "step": run.step,
      "split": config.test_split,
      "settings": {name: config[name] for name in (
          "beam_size", "length_penalty", "max_decode_length", "suppress_unk",
          "block_trigrams", "min_length", "decode_dtype",
          "num_eval_examples", "metrics_protocol")},
      "hard_attention_decoding": config.hard_attention.decoding,
      "metrics": scores,
      "captions": stem + ".json",
  }
  if parallel.is_first_process():
    epath.Path(stem).parent.mkdir(parents=True, exist_ok=True)
    _write_json(stem + ".json", captions)
    _write_json(stem + "_scores.json", report)
  return report


def _write_json(path: str, value: Any) -> None:
  """Writes `value` whole or not at all: a reader never sees half a file."""
  tmp = epath.Path(path + ".tmp")
  tmp.write_text(json.dumps(value, indent=1) + "\n")
  tmp.replace(path)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags; only when run as a program."""
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_bool("best", False, "Use WORKDIR/best, the top checkpoint by "
                    "the evaluation metric, instead of WORKDIR/checkpoints.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.",
                       lower_bound=0)
  flags.DEFINE_string("split", None, "Split to score; default the run's "
                      "test_split.")
  flags.DEFINE_integer("num_examples", None, "Images to score at most (-1: "
                       "the whole split); default the run's "
                       "num_eval_examples.")
  flags.DEFINE_integer("beam_size", None, "Beam size; 1 is greedy. Default: "
                       "the run's.", lower_bound=1)
  flags.DEFINE_float("length_penalty", None, "GNMT length penalty exponent; "
                     "default the run's.")
  flags.DEFINE_bool("suppress_unk", None, "Never emit <unk>; default the "
                    "run's.")
  flags.DEFINE_bool("block_trigrams", None, "No trigram twice in a caption; "
                    "default the run's.")
  flags.DEFINE_integer("min_length", None, "Words before EOS at least; "
                       "default the run's.", lower_bound=0)
  flags.DEFINE_enum("decode_dtype", None, list(captioner.DTYPES),
                    "Matmul inputs of the decoder; default the run's.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir where the data is "
                      "now; default the run's.")
  flags.DEFINE_string("manual_dir", None, "Manual files of the dataset "
                      "(karpathy_captions); default the run's.")
  flags.DEFINE_enum("hard_attention_decoding", None, ["soft", "hard"],
                    "How a hard attention run decodes: the expected context "
                    "or the most likely region; default the run's.")
  flags.DEFINE_enum("metrics_protocol", None, list(metrics_lib.PROTOCOLS),
                    "coco: the COCO caption protocol (PTB tokenizer and "
                    "METEOR, on Java); regex-tokens: without Java, marked as "
                    "not comparable with published scores; auto: coco where "
                    "Java is found. Default: the run's.")
  flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  directory = os.path.join(FLAGS.workdir,
                           "best" if FLAGS.best else "checkpoints")
  # The run's own CPU split, decided before JAX starts, so the split is
  # decoded in the same batches as the run's evaluations.
  start = ml_collections.ConfigDict(
      {"cpu_devices": 1, "batch_size": 1, "eval_batch_size": 1})
  saved = checkpoint_lib.saved_config(directory, FLAGS.step)
  if saved is not None:
    start = ml_collections.ConfigDict(
        {name: saved[name]
         for name in ("cpu_devices", "batch_size", "eval_batch_size")})
  # One process: an evaluation does not join the run's cluster.
  start.distributed = "no"
  start.coordinator_address = ""
  start.num_processes = 0
  start.process_id = -1
  report = runtime.run(
      lambda: start,
      lambda _: evaluate_run(
          FLAGS.workdir, best=FLAGS.best, step=FLAGS.step, split=FLAGS.split,
          num_examples=FLAGS.num_examples,
          **{name: FLAGS[name].value for name in _OVERRIDES}))
  print(f"{report['split']}, step {report['step']}, beam "
        f"{report['settings']['beam_size']}: "
        f"{evaluator.format_metrics(report['metrics'])}", flush=True)
  print(f"Captions: {report['captions']}", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
