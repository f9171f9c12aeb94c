"""The one module that speaks Orbax: save, resume and restore for sampling.

A checkpoint at step N holds four items: `state` (the TrainState pytree),
`vocab` (the word list, JSON), `config` (the run config, JSON) and `info`
(what else the run knows about itself, JSON: e.g. which encoder extracted
the features it trained on), so a checkpoint directory alone is enough to
rebuild the model and caption images.
"""

import logging as pylogging
import os
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
from visionspeak_jax import vocabulary as vocab_lib
from visionspeak_jax import workdir as workdir_lib


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


class CheckpointError(errors.UserError):
  """A checkpoint that cannot be used, with a message that says what to do."""


def has_checkpoint(directory: str) -> bool:
  """Whether `directory` holds at least one saved step (creates nothing)."""
  if not epath.Path(directory).is_dir():
    return False
  ckpt = Checkpointer(directory)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


class Checkpointer:
  """Saves and restores (state, vocabulary, config) under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2,
               best_metric: str | None = None):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: where the numbered step folders go.
      max_to_keep: checkpoints kept; the oldest (or, with `best_metric`, the
        worst) are deleted.
      best_metric: keep the checkpoints with the highest value of this metric
        (passed to `save`) instead of the newest ones.
    """
    self.directory = workdir_lib.absolute(directory)
    # Before any read: the echoes of a failed one come from other threads.
    quiet_failed_reads()
    # A save cut short by a kill leaves a temporary folder, never a step:
    # clear those away.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           create=True,
                                           cleanup_tmp_directories=True)
    if best_metric is not None:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
          best_fn=lambda metrics: metrics[best_metric], best_mode="max")
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "vocab": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "info": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best metric (the newest without `best_metric`)."""
    return self._manager.best_step()

  def save(self, step: int, state: Any, vocab: vocab_lib.Vocabulary,
           config: ml_collections.ConfigDict,
           metrics: dict[str, float] | None = None,
           info: dict[str, Any] | None = None) -> None:
    """Saves asynchronously; call `wait` before reading it back.

    `metrics` are required when the checkpointer keeps the best checkpoints;
    `info` is any JSON-able record about the run (see `restore_info`).
    """
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
            ml_collections.ConfigDict(restored["config"]))

  def restore_newest_intact(self, restore: Callable[[int], T]
                            ) -> tuple[int, T] | None:
    """`restore(step)` on the newest step that can be read.

    A step that fails to restore (a truncated or missing file) is logged and
    the one before it tried, so one damaged checkpoint does not end a run.
    A `UserError` from `restore` (e.g. a config that does not fit) is not
    damage and stops the search.

    Args:
      restore: reads one step; called newest first.

    Returns:
      (step, what `restore` returned), or None when there is no checkpoint.

    Raises:
      CheckpointError: every saved step is damaged.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    first_failure = None
    for step in steps:
      try:
        return step, restore(step)
      except errors.UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Orbax, TensorStore and the JSON reader report damage in many ways.
        detail = describe_failure(e)
        first_failure = first_failure or f"step {step}: {detail}"
        logging.warning("The checkpoint of step %d in %s is damaged (%s)%s",
                        step, self.directory, detail,
                        "; trying the one before it." if step != steps[-1]
                        else ".")
    if first_failure is None:
      return None
    raise CheckpointError(
        f"No intact checkpoint in {self.directory} (steps "
        f"{', '.join(map(str, steps))} are all damaged; {first_failure}): "
        "move that directory away to start afresh.")

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
