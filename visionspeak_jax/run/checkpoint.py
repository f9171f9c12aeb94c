"""The one module that speaks Orbax: save, resume and restore for sampling.

A checkpoint at step N holds four items: `state` (the TrainState pytree),
`vocab` (the word list, JSON), `config` (the run config, JSON) and `info`
(what else the run knows about itself, JSON: e.g. which encoder extracted
the features it trained on), so a checkpoint directory alone is enough to
rebuild the model and caption images.
"""

import logging as pylogging
import sys
import traceback
from typing import Any, Callable, TypeVar

from absl import logging
from etils import epath
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from visionspeak_jax import errors
from visionspeak_jax.evaluation import metrics as metrics_lib
from visionspeak_jax.platform import paths
from visionspeak_jax.text import vocabulary as vocab_lib


def _to_global(tree: Any) -> Any:
  """Replicated per-process values -> arrays over every process's devices.

  In a multi-process run the pmapped step returns the (identical) state as
  arrays local to each process; Orbax writes and reads global arrays.
  """
  if jax.process_count() == 1:
    return tree
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), P())

  def convert(x):
    if not hasattr(x, "shape"):
      return x
    return jax.make_array_from_process_local_data(
        sharding, np.asarray(jax.device_get(x)))

  return jax.tree.map(convert, tree)


def _to_local(tree: Any) -> Any:
  """Restored global arrays -> host values every process can feed to pmap."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0))
      if isinstance(x, jax.Array) else x, tree)


T = TypeVar("T")
_quieted = False


def describe_failure(e: Exception) -> str:
  """A short `Type: first line` of a failed read, for one-line messages."""
  line = (str(e).strip().splitlines() or [""])[0]
  # TensorStore appends its whole spec after this.
  line = line.split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {line[:200]}"


def quiet_failed_reads() -> None:
  """Silences the echoes of a restore that failed on damaged files.

  The failing read ends Orbax's event loop while other TensorStore reads
  are still in flight; each of them then reports its own failure or "Event
  loop is closed" as an unraisable exception with a traceback, and asyncio
  logs the abandoned gather. The damage itself is reported in one line by
  the caller; unraisables from elsewhere still print.
  """
  global _quieted
  if _quieted:
    return
  _quieted = True
  previous = sys.unraisablehook

  def hook(unraisable):
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if not any(part in frame.filename for frame in frames
               for part in ("/orbax/", "/asyncio/")):
      previous(unraisable)

  sys.unraisablehook = hook
  pylogging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())
  # Every reader opens read-only on purpose; Orbax warns each time.
  pylogging.getLogger("absl").addFilter(
      lambda record: not record.getMessage().startswith(
          "Given directory is read only"))


# Fields added after runs were saved without them, each with the value
# that does what those runs did. A saved config is completed with them as it
# is read (`restore_metadata`, `saved_config`), so no reader needs a
# fallback of its own.
_ADDED_FIELDS = (
    ("model.grid", 0),  # The ResNet's own map.
    ("model.grid_upsample", False),
    ("captions_per_image", 1),
    ("grad_clip_value", 0.0),  # No element-wise clipping.
    ("suppress_unk", False),
    ("block_trigrams", False),
    ("min_length", 0),
    ("hard_attention.decoding", "hard"),  # The argmax region, as then.
)
# What a run saved before `metrics_protocol` asked for with
# `metrics_use_java` (None: Java where found).
_PROTOCOL_OF_USE_JAVA = {None: metrics_lib.AUTO, True: metrics_lib.COCO,
                         False: metrics_lib.REGEX_TOKENS}


def complete_saved_config(config: ml_collections.ConfigDict
                          ) -> ml_collections.ConfigDict:
  """A saved config with every field added since, as that run used it.

  Args:
    config: a config read from a checkpoint; changed in place.

  Returns:
    `config`.
  """
  for path, value in _ADDED_FIELDS:
    *parents, name = path.split(".")
    node = config
    for parent in parents:
      node = node.get(parent)
      if node is None:  # E.g. no hard_attention: nothing reads it.
        break
    else:
      if name not in node:
        node[name] = value
  if "metrics_protocol" not in config:
    config.metrics_protocol = _PROTOCOL_OF_USE_JAVA[
        config.get("metrics_use_java")]
  return config


def saved_config(directory: str, step: int | None = None
                 ) -> ml_collections.ConfigDict | None:
  """The config saved with a checkpoint, read before JAX's backend starts.

  A tool that restores a run chooses the CPU device split from the run's
  config, and that choice must precede anything that starts JAX, which
  opening a `Checkpointer` does. This reads the config item alone.

  Args:
    directory: the checkpoint directory.
    step: the step; default the newest finished one.

  Returns:
    The config, or None where it cannot be read (the restore that follows
    reports why).
  """
  try:
    root = epath.Path(paths.absolute(directory))
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    if step is None:
      step = steps[-1] if steps else None
    if step is None or step not in steps:
      return None
    saved = ocp.JsonCheckpointHandler().restore(root / str(step) / "config")
    return complete_saved_config(ml_collections.ConfigDict(saved))
  except Exception:  # pylint: disable=broad-except
    return None


class CheckpointError(errors.UserError):
  """A checkpoint that cannot be used, with a message that says what to do."""


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds at least one saved step (changes nothing)."""
  if not epath.Path(directory).is_dir():
    return False
  ckpt = Checkpointer(directory)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


class Checkpointer:
  """Saves and restores (state, vocabulary, config) under `directory`.

  Opened for reading by default: the caption CLI, the demo, `init_from` and
  feature extraction read runs that may be training at that moment, and
  must leave the trainer's files alone. Only the process that holds the
  workdir's lock (`workdir.Lock`) opens it with `write=True`.
  """

  def __init__(self, directory: str, *, write: bool = False,
               max_to_keep: int = 2, best_metric: str | None = None):
    """Opens a checkpoint directory.

    Args:
      directory: where the numbered step folders go.
      write: open for saving: creates the directory, deletes what a killed
        save left behind, and deletes old checkpoints beyond `max_to_keep`.
        Without it nothing on disk changes (Orbax's read-only mode).
      max_to_keep: checkpoints kept; the oldest (or, with `best_metric`, the
        worst) are deleted. Writers only.
      best_metric: keep the checkpoints with the highest value of this metric
        (passed to `save`) instead of the newest ones. Writers only.
    """
    self.directory = paths.absolute(directory)
    self.write = write
    # Before any read: the echoes of a failed one come from other threads.
    quiet_failed_reads()
    options = None
    if write:
      # A save cut short by a kill leaves a temporary folder, never a step:
      # the writer clears those away. A reader never does: the folder may
      # be the trainer's save in flight.
      best = {}
      if best_metric is not None:
        best = dict(best_fn=lambda metrics: metrics[best_metric],
                    best_mode="max")
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
          **best)
    self._manager = self._open(options)

  def _open(self, options: ocp.CheckpointManagerOptions | None = None
            ) -> ocp.CheckpointManager:
    """A manager of the directory; read-only unless `options` are given."""
    if options is None:
      # Lightweight: a reader needs the step list, not each step's metrics.
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, cleanup_tmp_directories=False,
          max_to_keep=None, save_interval_steps=0,
          lightweight_initialize=True)
    return ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "vocab": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "info": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, vocab: vocab_lib.Vocabulary,
           config: ml_collections.ConfigDict,
           metrics: dict[str, float] | None = None,
           info: dict[str, Any] | None = None) -> None:
    """Saves asynchronously; call `wait` before reading it back.

    `metrics` are required when the checkpointer keeps the best checkpoints;
    `info` is any JSON-able record about the run (see `restore_info`).
    """
    if not self.write:
      # Orbax's read-only mode would skip the save without a word.
      raise RuntimeError(f"{self.directory} is open for reading; open it with "
                         "Checkpointer(..., write=True) to save.")
    logging.info("Saving the checkpoint of step %d in %s.", step,
                 self.directory)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(_to_global(state)),
        vocab=ocp.args.JsonSave(vocab.to_json()),
        config=ocp.args.JsonSave(config.to_dict()),
        info=ocp.args.JsonSave(info or {})), metrics=metrics)

  def restore_state(self, target: Any, step: int | None = None) -> Any:
    """Restores the state into the structure, shapes and dtypes of `target`."""
    return self._restore_tree(_to_global(target), self._step(step))

  def restore_weights(self, step: int | None = None) -> tuple[Any, Any]:
    """(params, batch_stats) of a checkpoint, whatever model they belong to.

    Their structure is read from the checkpoint itself, and the optimizer
    state is not read at all.
    """
    step = self._step(step)
    saved = self._manager.item_metadata(step)["state"].tree
    if jax.process_count() == 1:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
      sharding = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), P())
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        {"params": saved["params"], "batch_stats": saved["batch_stats"]})
    restored = self._restore_tree(target, step, partial=True)
    return restored["params"], restored["batch_stats"]

  def _restore_tree(self, target: Any, step: int, partial: bool = False
                    ) -> Any:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(
                target), partial_restore=partial)))
    return _to_local(restored["state"])

  def restore_metadata(self, step: int | None = None
                       ) -> tuple[vocab_lib.Vocabulary,
                                  ml_collections.ConfigDict]:
    """The vocabulary and config saved with a checkpoint."""
    step = self._step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        vocab=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return (vocab_lib.Vocabulary.from_json(restored["vocab"]),
            complete_saved_config(
                ml_collections.ConfigDict(restored["config"])))

  def restore_newest_intact(self, restore: Callable[[int], T]
                            ) -> tuple[int, T] | None:
    """`restore(step)` on the newest step that can be read.

    A step that fails to restore (a truncated or missing file) is logged and
    the one before it tried, so one damaged checkpoint does not end a run.
    A step that the training process deleted while it was read (it keeps
    only the newest few) is not damage: the steps are listed again and the
    newest tried. A `UserError` from `restore` (e.g. a config that does not
    fit) is not damage and stops the search.

    Args:
      restore: reads one step; called newest first.

    Returns:
      (step, what `restore` returned), or None when there is no checkpoint.

    Raises:
      CheckpointError: every saved step is damaged.
    """
    damaged = {}  # step -> what failed
    steps = self._list_steps(reload=False)
    while True:
      candidates = [s for s in steps if s not in damaged]
      if not candidates:
        break
      step = candidates[-1]
      try:
        return step, restore(step)
      except errors.UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Orbax, TensorStore and the JSON reader report damage in many ways.
        detail = describe_failure(e)
        steps = self._list_steps(reload=True)
        if step not in steps:
          logging.info("The checkpoint of step %d in %s was deleted while it "
                       "was read; reading the newest again.", step,
                       self.directory)
          continue
        damaged[step] = detail
        logging.warning("The checkpoint of step %d in %s is damaged (%s)%s",
                        step, self.directory, detail,
                        "; trying the one before it."
                        if len(candidates) > 1 else ".")
    if not damaged:
      return None
    newest = max(damaged)
    raise CheckpointError(
        f"No intact checkpoint in {self.directory} (steps "
        f"{', '.join(map(str, sorted(damaged)))} are all damaged; step "
        f"{newest}: {damaged[newest]}): move that directory away to start "
        "afresh.")

  def _list_steps(self, reload: bool) -> list[int]:
    """The saved steps, oldest first; `reload` reads the directory again."""
    if reload:
      self._manager.reload()
    return sorted(self._manager.all_steps())

  def restore_info(self, step: int | None = None) -> dict[str, Any]:
    """The `info` record saved with a checkpoint ({} when there is none)."""
    step = self._step(step)
    if "info" not in self._manager.item_metadata(step):
      return {}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        info=ocp.args.JsonRestore()))
    return restored["info"]

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
    if step is None:
      raise CheckpointError(f"No checkpoint in {self.directory}: train first "
                            "with visionspeak_jax.main, or point --workdir "
                            "at a finished run.")
    if step not in self._manager.all_steps():
      raise CheckpointError(f"No checkpoint for step {step} in "
                            f"{self.directory}; saved steps: "
                            f"{sorted(self._manager.all_steps())}.")
    return step

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
