"""TensorBoard summaries of a training run: `tensorboard --logdir WORKDIR`.

`TensorBoardLog` writes, with `tf.summary`, into WORKDIR/tensorboard:
  - `train/<name>`: every logged training metric (loss terms, accuracy,
    learning rate, gradient norm, training speed) at its step;
  - `<split>/<name>`: every evaluation metric of `split` (e.g.
    `validation/cider`, `test/bleu4`);
  - `<split>/attention/<i>`: at every evaluation, the attention figure
    (`figures.attention_figure`) of the i-th of the first few images of the
    split, and `<split>/caption/<i>` its caption and first reference (runs
    on a feature cache have no images, so no figures).

Like `workdir.MetricsLog`, a resumed run drops what was written after the
step it resumes from: the event files are rewritten with only the points up
to that step (`resume`), so no reader ever sees a step twice, whatever its
purge rules (TensorBoard's Python loader purges only after a SessionLog
event, which `tf.summary` never writes; its Rust data server only per time
series, and only once a step is written again). The kept points are written
again with `tf.summary.experimental.write_raw_pb`, so their wall time becomes
that of the resume.

Only process 0 of a multi-process run writes (`enabled`).
"""

import os
from typing import Any, Sequence

from absl import logging
import numpy as np
from tensorboard.backend.event_processing import event_file_loader
import tensorflow as tf

from visionspeak_jax.evaluation import evaluator
from visionspeak_jax.run import figures

SUBDIR = "tensorboard"
_EVENTS_GLOB = "events.out.tfevents.*"


def figure_array(shown: evaluator.Shown) -> np.ndarray:
  """The attention figure of `shown` as uint8 [H, W, 3]."""
  return figures.attention_figure_array(shown.image, shown.words,
                                        shown.alphas, panel_size=128)


class TensorBoardLog:
  """WORKDIR/tensorboard, one point per (tag, step)."""

  def __init__(self, workdir: str, enabled: bool = True):
    """Opens the log; `enabled` is False on every process but the first."""
    self.logdir = os.path.join(workdir, SUBDIR)
    self.enabled = enabled
    self._writer = None

  def _events_files(self) -> list[str]:
    return sorted(tf.io.gfile.glob(os.path.join(self.logdir, _EVENTS_GLOB)))

  def resume(self, step: int) -> None:
    """Starts writing; keeps only the points written up to `step`.

    The kept points go into a new event file, then the old files are
    deleted. A kill in between leaves both; the next `resume` reads both and
    keeps each (tag, step) once.
    """
    if not self.enabled:
      return
    tf.io.gfile.makedirs(self.logdir)
    old = self._events_files()
    kept: dict[tuple[tuple[str, ...], int], bytes] = {}
    dropped = 0
    for path in old:
      try:
        for event in event_file_loader.EventFileLoader(path).Load():
          if not event.HasField("summary"):
            continue  # The file version record; the writer writes its own.
          if event.step > step:
            dropped += 1
            continue
          key = (tuple(v.tag for v in event.summary.value), event.step)
          kept[key] = event.summary.SerializeToString()  # Newest file wins.
      except tf.errors.OpError as e:
        # A file this process cannot read back would only hold points it
        # cannot keep either; TensorBoard skips such files too.
        logging.warning("Skipping the unreadable event file %s: %s", path, e)
    self._writer = tf.summary.create_file_writer(self.logdir)
    if kept:
      with self._writer.as_default():
        for (_, event_step), summary in sorted(kept.items(),
                                               key=lambda kv: kv[0][1]):
          tf.summary.experimental.write_raw_pb(summary, step=event_step)
    self._writer.flush()
    for path in old:
      tf.io.gfile.remove(path)
    if old:
      logging.info("TensorBoard: kept %d points up to step %d, dropped %d "
                   "written after it.", len(kept), step, dropped)

  def write(self, record: dict[str, Any],
            shown: Sequence[evaluator.Shown] = ()) -> None:
    """Writes a `MetricsLog` record's numbers, and attention figures.

    Args:
      record: {"step": s, "split": name, metric: value, ...}; every number
        becomes the scalar `<split>/<metric>`.
      shown: evaluation images to draw as `<split>/attention/<i>`.
    """
    if not self.enabled:
      return
    if self._writer is None:
      raise RuntimeError("Call TensorBoardLog.resume before write.")
    step, split = int(record["step"]), record["split"]
    with self._writer.as_default(step=step):
      for name, value in sorted(record.items()):
        if name in ("step", "split") or isinstance(value, bool):
          continue
        if isinstance(value, (int, float, np.number)):
          tf.summary.scalar(f"{split}/{name}", float(value))
      for i, item in enumerate(shown):
        tf.summary.image(f"{split}/attention/{i}",
                         figure_array(item)[None], max_outputs=1)
        tf.summary.text(f"{split}/caption/{i}",
                        f"{' '.join(item.words)}  (reference: "
                        f"{item.reference})")
    # Infrequent writes: flushing each makes them visible at once.
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
