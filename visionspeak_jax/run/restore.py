"""Restoring runs and loading weights: the one layer between files and models.

- `restore_run`: a run's config, vocabulary, parameters and BatchNorm
  statistics, read from its checkpoint (the caption CLI, feature extraction,
  `config.init_from`).
- `encoder_from_source`: encoder weights named by a source string, a
  torchvision-style file (`pretrained:PATH`), a run's checkpoint
  (`checkpoint:DIR@STEP`) or a seeded random init (`random:seed=N`); a
  feature cache records the one that extracted it.
- `merge_weights`: loaded subtrees into fresh parameters, shapes checked.
- `initial_weights`: where a new run starts: a random init, the pretrained
  encoder of `config.model.pretrained_path`, then `config.init_from`.

Training resume restores the whole train state instead (`train.py`).
"""

import dataclasses
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from visionspeak_jax.models import captioner
from visionspeak_jax.models import pretrained
from visionspeak_jax.platform import paths
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.text import vocabulary as vocab_lib

CheckpointError = checkpoint_lib.CheckpointError


@dataclasses.dataclass
class Run:
  """What a checkpoint holds, without the optimizer state."""
  directory: str  # The checkpoint directory.
  step: int
  config: ml_collections.ConfigDict
  vocab: vocab_lib.Vocabulary
  params: Any  # {"encoder": ..., "decoder": ...}, or {"decoder": ...}
  batch_stats: Any
  info: dict[str, Any]  # `checkpoint.Checkpointer.restore_info`


def restore_checkpoint(directory: str, step: int | None = None) -> Run:
  """Restores a checkpoint directory's step.

  Args:
    directory: the checkpoint directory.
    step: the step; default the newest one that is intact (a damaged newer
      one is logged and skipped).

  Raises:
    checkpoint.CheckpointError: there is no such checkpoint, or it cannot
      be read.
  """
  directory = paths.absolute(directory)
  no_checkpoint = CheckpointError(
      f"No checkpoint in {directory}: point at a finished run's workdir, or "
      "train one first with visionspeak_jax.main.")
  if not epath.Path(directory).is_dir():
    raise no_checkpoint
  # Read-only: the run may be training now, its next save in flight.
  ckpt = checkpoint_lib.Checkpointer(directory)

  def read(step: int) -> Run:
    vocab, config = ckpt.restore_metadata(step)
    params, batch_stats = ckpt.restore_weights(step)
    return Run(directory=directory, step=int(step), config=config,
               vocab=vocab, params=params, batch_stats=batch_stats,
               info=ckpt.restore_info(step))

  try:
    if step is None:
      found = ckpt.restore_newest_intact(read)
      if found is None:
        raise no_checkpoint
      return found[1]
    return read(step)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Orbax reports a damaged or mismatched checkpoint in many ways; the
    # user's remedy is the same.
    which = "checkpoints" if step is None else f"checkpoint of step {step}"
    raise CheckpointError(
        f"The {which} in {directory} cannot be restored "
        f"({checkpoint_lib.describe_failure(e)}): use another saved step, or "
        "train again with this version.") from e
  finally:
    ckpt.close()


def restore_run(workdir: str, *, step: int | None = None,
                best: bool = False) -> Run:
  """Restores a run from its workdir.

  Args:
    workdir: the training run's directory.
    step: the checkpoint step; default the latest.
    best: read `best/` (the top checkpoint by the evaluation metric)
      instead of `checkpoints/`.

  Raises:
    checkpoint.CheckpointError: there is no usable checkpoint.
  """
  return restore_checkpoint(
      os.path.join(workdir, "best" if best else "checkpoints"), step)


def _resnet(config: ml_collections.ConfigDict) -> tuple[Any, ...]:
  m = config.model
  return str(m.resnet_size), m.resnet_width, m.resnet_stem


def pretrained_encoder(config: ml_collections.ConfigDict,
                       path: str | None = None) -> dict[str, Any]:
  """{"params", "batch_stats"} of the config's ResNet from a weights file.

  Args:
    config: the run config (the ResNet's size, width and stem).
    path: the file; default `config.model.pretrained_path`.

  Raises:
    pretrained.PretrainedError: the file is missing or does not fit.
  """
  size, width, stem = _resnet(config)
  return pretrained.load_encoder(path or config.model.pretrained_path, size,
                                 num_filters=width, stem=stem)


def run_encoder(config: ml_collections.ConfigDict, run: Run
                ) -> dict[str, Any]:
  """A run's encoder variables, if it is the config's ResNet.

  Raises:
    checkpoint.CheckpointError: the run has no encoder, or another one.
  """
  if "encoder" not in run.params or _resnet(run.config) != _resnet(config):
    size, width, stem = _resnet(config)
    raise CheckpointError(
        f"The checkpoint in {run.directory} holds no ResNet-{size} encoder "
        f"(width {width}, {stem} stem): use that run's config, or pass "
        "--config.model.pretrained_path.")
  return {"params": run.params["encoder"], "batch_stats": run.batch_stats}


def encoder_from_source(config: ml_collections.ConfigDict, source: str
                        ) -> dict[str, Any]:
  """Encoder variables {"params", "batch_stats"} named by a source string.

  Args:
    config: a config with the encoder's settings.
    source: `pretrained:PATH`, `checkpoint:DIR@STEP` or `random:seed=N`.

  Raises:
    checkpoint.CheckpointError, pretrained.PretrainedError: the source
      cannot be read.
    ValueError: an unknown source kind.
  """
  kind, _, where = source.partition(":")
  if kind == "pretrained":
    return pretrained_encoder(config, where)
  if kind == "checkpoint":
    directory, _, step = where.rpartition("@")
    return run_encoder(config, restore_checkpoint(directory, int(step)))
  if kind == "random":
    return captioner.init_encoder(
        jax.random.key(int(where.partition("=")[2])), config)
  raise ValueError(f"Unknown encoder source {source!r}.")


def extraction_encoder(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[dict[str, Any], str]:
  """The frozen encoder for feature extraction, and its source string.

  In order: `config.model.pretrained_path`; the latest checkpoint in
  WORKDIR/checkpoints; a random init if `config.extract_random_encoder`.

  Raises:
    checkpoint.CheckpointError: none of these is available, or the run's
      ResNet differs from the config's.
    pretrained.PretrainedError: the weights file does not fit.
  """
  path = config.model.pretrained_path
  if path:
    source = f"pretrained:{paths.absolute(path)}"
  elif checkpoint_lib.has_checkpoint(os.path.join(workdir, "checkpoints")):
    run = restore_run(workdir)
    return run_encoder(config, run), f"checkpoint:{run.directory}@{run.step}"
  elif config.extract_random_encoder:
    source = f"random:seed={config.seed}"
  else:
    raise CheckpointError(
        f"No encoder weights to extract features with (no checkpoint in "
        f"{os.path.join(paths.absolute(workdir), 'checkpoints')}): set "
        "--config.model.pretrained_path, point --workdir at a trained run, "
        "or pass --config.extract_random_encoder=True.")
  return encoder_from_source(config, source), source


def merge_weights(params: dict[str, Any], batch_stats: Any,
                  loaded_params: dict[str, Any], loaded_batch_stats: Any,
                  origin: str) -> tuple[dict[str, Any], Any, list[str]]:
  """Copies the loaded top-level subtrees that `params` has too.

  The encoder's BatchNorm statistics come with the encoder.

  Args:
    params: fresh parameters, {"encoder"?, "decoder"}.
    batch_stats: their BatchNorm statistics.
    loaded_params: loaded parameters, any of the same subtrees.
    loaded_batch_stats: the loaded encoder's statistics.
    origin: where they come from, for messages.

  Returns:
    (params, batch_stats, names of the copied subtrees).

  Raises:
    checkpoint.CheckpointError: a shared subtree has other shapes.
  """
  params, copied = dict(params), []
  for part in sorted(set(params) & set(loaded_params)):
    mine = jax.tree.map(lambda x: (x.shape, x.dtype), params[part])
    theirs = jax.tree.map(lambda x: (x.shape, x.dtype), loaded_params[part])
    if mine != theirs:
      raise CheckpointError(
          f"The {part} in {origin} has other shapes than this config's: use "
          "the same --config.model settings as that run.")
    params[part] = loaded_params[part]
    if part == "encoder":
      batch_stats = loaded_batch_stats
    copied.append(part)
  return params, batch_stats, copied


def check_encoder_start(config: ml_collections.ConfigDict, *, encoder: bool,
                        init_run: Run | None) -> None:
  """Stops a new run that would train on a random ResNet against its config.

  With `config.model.require_pretrained` (the COCO recipes), the encoder of
  a run on images must come from `captioner.pretrained_path` or from
  `init_from`'s run (its encoder, or the one recorded for its features).

  Args:
    config: the new run's config.
    encoder: the run has an encoder (it reads images, not features).
    init_run: `restore_run(config.init_from)`, or None.

  Raises:
    pretrained.PretrainedError: no weights for the encoder, in one sentence
      that says where to get them.
  """
  if (not encoder or not config.model.require_pretrained
      or config.model.pretrained_path):
    return
  if init_run is not None and ("encoder" in init_run.params
                               or "encoder_source" in init_run.info):
    return
  raise pretrained.PretrainedError(
      f"This config trains on an ImageNet-pretrained "
      f"ResNet-{config.model.resnet_size} and no weights were given: save "
      "torchvision's or timm's resnet"
      f"{config.model.resnet_size} state dict as .safetensors (docs/"
      "cached_features.md) and pass --config.model.pretrained_path=FILE, "
      "or pass --config.model.require_pretrained=False to train a random "
      "encoder (smoke tests only).")


def initial_weights(config: ml_collections.ConfigDict,
                    params: dict[str, Any], batch_stats: Any,
                    init_run: Run | None = None) -> tuple[dict[str, Any], Any]:
  """Where a new run starts, given its random init.

  First the encoder from `config.model.pretrained_path`, then every subtree
  that `init_run` (the run of `config.init_from`) has. A decoder taken over
  from a run trained on a feature cache learnt on one encoder's features;
  that run's `info` names the encoder, which must then be this one: it is
  rebuilt from its source, or, with `pretrained_path`, the file must hold it.

  Args:
    config: the new run's config.
    params: its random parameters.
    batch_stats: their BatchNorm statistics.
    init_run: `restore_run(config.init_from)`, or None.

  Returns:
    (params, batch_stats).

  Raises:
    checkpoint.CheckpointError: shapes differ, or the recorded encoder
      cannot be rebuilt or is another one.
    pretrained.PretrainedError: the weights file does not fit.
  """
  pretrained_path = config.model.pretrained_path
  if pretrained_path and "encoder" in params:
    encoder = pretrained_encoder(config)
    params, batch_stats, _ = merge_weights(
        params, batch_stats, {"encoder": encoder["params"]},
        encoder["batch_stats"], pretrained_path)
  if init_run is None:
    return params, batch_stats
  origin = f"{config.init_from} (step {init_run.step})"
  params, batch_stats, copied = merge_weights(
      params, batch_stats, init_run.params, init_run.batch_stats, origin)
  logging.info("Initialised %s from %s.", " and ".join(copied) or "nothing",
               origin)
  if "encoder" not in params or "encoder" in copied:
    return params, batch_stats
  source = init_run.info.get("encoder_source")
  if source is None:
    logging.warning("%s records no encoder for the decoder's features: the "
                    "encoder starts from %s.", origin,
                    pretrained_path or "a random init")
    return params, batch_stats
  expected = init_run.info["encoder_fingerprint"]
  if pretrained_path:
    mine = pretrained.fingerprint({"params": params["encoder"],
                                   "batch_stats": batch_stats})
    if mine != expected:
      raise CheckpointError(
          f"The encoder weights in {pretrained_path} (fingerprint {mine}) are "
          f"not the ones the decoder of {config.init_from} learnt from "
          f"({source}, fingerprint {expected}): pass those weights, or drop "
          "--config.model.pretrained_path to rebuild them.")
    return params, batch_stats
  try:
    encoder = encoder_from_source(init_run.config, source)
  except (pretrained.PretrainedError, CheckpointError) as e:
    raise CheckpointError(
        f"The encoder {source} that extracted the features of "
        f"{config.init_from} cannot be rebuilt ({str(e).rstrip('.')}): pass "
        "its weights with --config.model.pretrained_path.") from e
  fingerprint = pretrained.fingerprint(encoder)
  if fingerprint != expected:
    raise CheckpointError(
        f"The encoder {source} has changed since it extracted the features "
        f"of {config.init_from} (fingerprint {fingerprint}, not {expected}): "
        "pass the original weights with --config.model.pretrained_path.")
  logging.info("The encoder starts from %s, which extracted the features the "
               "decoder of %s learnt from.", source, config.init_from)
  params, batch_stats, _ = merge_weights(
      params, batch_stats, {"encoder": encoder["params"]},
      encoder["batch_stats"], source)
  return params, batch_stats
