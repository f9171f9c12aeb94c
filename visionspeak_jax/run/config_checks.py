"""The whole config checked at start-up, before any data or compile work.

Every mistake is one `errors.ConfigError` sentence naming the field, the
bad value and what would work. `validate` covers single values and their
combinations with the devices; `check_workdir` the run directory;
`check_resume` a changed config against a run's checkpoint.
"""

import os
import shutil
from typing import Any

from etils import epath
import ml_collections

from visionspeak_jax import errors
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.data import sources
from visionspeak_jax.evaluation import metrics
from visionspeak_jax.models import attention
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoder
from visionspeak_jax.models import resnet
from visionspeak_jax.platform import cpu_tuning
from visionspeak_jax.platform import distributed
from visionspeak_jax.platform import dtypes
from visionspeak_jax.training import optimizer
from visionspeak_jax.training import scst

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider",
           "content_f1", "grounding")

# Fields that must be whole numbers >= 1.
_AT_LEAST_ONE = (
    "batch_size", "eval_batch_size", "image_size", "num_train_steps",
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "beam_size", "max_decode_length",
    "max_caption_length", "vocab_min_count", "shuffle_buffer_size",
    "captions_per_image",
    "prefetch_batches", "model.embed_dim", "model.attention_dim",
    "model.hidden_dim", "model.resnet_width")
# Fields that must be >= 0.
_NON_NEGATIVE = ("learning_rate", "warmup_steps", "weight_decay",
                 "grad_clip_norm", "grad_clip_value", "alpha_c", "length_penalty",
                 "hard_attention.reinforce_weight",
                 "hard_attention.entropy_weight")
# Fields that must be True or False.
_BOOLS = ("suppress_unk", "block_trigrams", "model.grid_upsample")
# Fields that must be strings ("" where they are optional).
_STRINGS = ("manual_dir",)
# Fields with a fixed set of values.
_CHOICES = {
    "data_source": sources.KINDS,
    "dtype": (*captioner.DTYPES, dtypes.AUTO),
    "objective": scst.OBJECTIVES,
    "scst.baseline": scst.BASELINES,
    "decode_dtype": (*captioner.DTYPES, dtypes.AUTO),
    "model.gate": decoder.GATES,
    "model.attention": attention.KINDS,
    "hard_attention.decoding": attention.KINDS,
    "model.resnet_size": tuple(resnet.SIZES),
    "model.resnet_stem": resnet.STEMS,
    "best_metric": METRICS,
    "metrics_protocol": metrics.PROTOCOLS,
}
# Fields whose change alters the shapes or structure of a run's state.
_STATE_FIELDS = (
    "data_source", "model.resnet_size", "model.resnet_width",
    "model.resnet_stem", "model.embed_dim", "model.attention_dim",
    "model.hidden_dim", "model.gate", "model.deep_output",
    "model.position_embedding", "model.attention", "model.grid")


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field's range and choices and the device arithmetic.

  Raises:
    errors.ConfigError: the first problem found, in one sentence.
  """
  for path in _AT_LEAST_ONE:
    value = _get(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.ConfigError(
          f"config.{path} must be a whole number >= 1, got {value!r}: fix "
          f"--config.{path}.")
  for path in _NON_NEGATIVE:
    value = _get(config, path)
    if not isinstance(value, (int, float)) or not value >= 0:
      raise errors.ConfigError(
          f"config.{path} must be a number >= 0, got {value!r}: fix "
          f"--config.{path}.")
  for path in _BOOLS:
    value = _get(config, path)
    if not isinstance(value, bool):
      raise errors.ConfigError(
          f"config.{path} must be True or False, got {value!r}: fix "
          f"--config.{path}.")
  for path in _STRINGS:
    value = _get(config, path)
    if not isinstance(value, str):
      raise errors.ConfigError(
          f"config.{path} must be a string (\"\" for the default), got "
          f"{value!r}: fix --config.{path}.")
  # max_decode_length is a whole number >= 1 by now. A minimum that reaches
  # it would forbid every EOS.
  min_length = config.min_length
  if (isinstance(min_length, bool) or not isinstance(min_length, int)
      or not 0 <= min_length < config.max_decode_length):
    raise errors.ConfigError(
        f"config.min_length must be a whole number >= 0 and below "
        f"config.max_decode_length ({config.max_decode_length}), got "
        f"{min_length!r}: fix --config.min_length.")
  for name in config.lr_mults:
    optimizer.multiplier(config, name)
  for path, choices in _CHOICES.items():
    value = _get(config, path)
    if str(value) not in choices:
      raise errors.ConfigError(
          f"config.{path} must be one of {', '.join(choices)}, got "
          f"{value!r}: fix --config.{path}.")
  if config.objective == "scst" and config.captions_per_image != 1:
    raise errors.ConfigError(
        "config.captions_per_image must be 1 for self-critical training (it "
        "samples its own config.scst.num_samples captions per image), got "
        f"{config.captions_per_image!r}: fix --config.captions_per_image.")
  if config.objective == "scst" and config.scst.num_samples < 2:
    raise errors.ConfigError(
        f"config.scst.num_samples must be >= 2 for self-critical training, "
        f"got {config.scst.num_samples!r}: fix --config.scst.num_samples.")
  for path, low, high in (("hard_attention.sample_prob", 0, 1),
                          ("hard_attention.baseline_decay", 0, 1)):
    value = _get(config, path)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not low <= value <= high):
      raise errors.ConfigError(
          f"config.{path} must be a number in [{low}, {high}], got {value!r}:"
          f" fix --config.{path}.")
  if not 0 <= config.model.dropout_rate < 1:
    raise errors.ConfigError(
        f"config.model.dropout_rate must be in [0, 1), got "
        f"{config.model.dropout_rate!r}: fix --config.model.dropout_rate.")
  grid = config.model.grid
  if isinstance(grid, bool) or not isinstance(grid, int) or grid < 0:
    raise errors.ConfigError(
        f"config.model.grid must be a whole number >= 0 (0: the ResNet's own "
        f"map), got {grid!r}: fix --config.model.grid.")
  if config.num_eval_examples != -1 and config.num_eval_examples < 1:
    raise errors.ConfigError(
        f"config.num_eval_examples must be -1 (the whole split) or >= 1, got "
        f"{config.num_eval_examples!r}: fix --config.num_eval_examples.")
  # Checked where they are read, before the rest: at start-up.
  cpu_tuning.check_cpu_devices(config)
  distributed.check_mode(config)
  input_pipeline.check_batch_sizes(config)
  if config.init_from and not epath.Path(config.init_from).is_dir():
    raise errors.ConfigError(
        f"config.init_from {config.init_from!r} is not a directory: point it "
        "at a finished run's workdir.")
  if config.metrics_protocol == metrics.COCO and shutil.which("java") is None:
    raise errors.ConfigError(
        "config.metrics_protocol is coco (the COCO caption protocol: the PTB "
        "tokenizer and METEOR, both on Java) but no `java` is on the PATH: "
        "install a Java runtime (e.g. apt-get install default-jre-headless), "
        "or pass --config.metrics_protocol=regex-tokens (tools.evaluate: "
        "--metrics_protocol=regex-tokens) for scores marked as not comparable "
        "with published ones.")
  if (config.best_metric == "meteor"
      and metrics.resolve_protocol(config.metrics_protocol) != metrics.COCO):
    raise errors.ConfigError(
        "config.best_metric is meteor, which only the coco metric protocol "
        "scores, and this run scores with regex-tokens (no `java` on the "
        "PATH, or metrics_protocol=regex-tokens): install a Java runtime, or "
        "pick another --config.best_metric.")
  path = config.model.pretrained_path
  if path and not epath.Path(path).is_file():
    raise errors.ConfigError(
        f"config.model.pretrained_path {path!r} is not a file: fix "
        "--config.model.pretrained_path.")
  try:
    h, w = captioner.encoder_map(config)
  except Exception as e:  # pylint: disable=broad-except
    # Too small an image for the ResNet's strides fails deep inside Flax.
    raise errors.ConfigError(
        f"config.image_size {config.image_size} is too small for "
        f"ResNet-{config.model.resnet_size} with the "
        f"{config.model.resnet_stem} stem ({type(e).__name__}): raise "
        "--config.image_size.") from e
  if h < 1 or w < 1:
    raise errors.ConfigError(
        f"config.image_size {config.image_size} gives no region with "
        f"ResNet-{config.model.resnet_size} and the "
        f"{config.model.resnet_stem} stem: raise --config.image_size.")
  if (h < grid or w < grid) and not config.model.grid_upsample:
    raise errors.ConfigError(
        f"config.model.grid {grid} is finer than the {h}x{w} map that "
        f"ResNet-{config.model.resnet_size} gives at config.image_size "
        f"{config.image_size}: lower --config.model.grid, raise "
        "--config.image_size, or set --config.model.grid_upsample=True to "
        "repeat cells as sgrvinod's tutorial does.")
  # The paper's code hands Theano the stochastic model's gradient on alpha
  # (`known_grads`), which replaces the penalty's: it has no effect there.
  if captioner.attention_kind(config) == "hard" and config.alpha_c > 0:
    raise errors.ConfigError(
        "config.alpha_c must be 0 with config.model.attention='hard' (the "
        "paper's code has no doubly stochastic penalty there), got "
        f"{config.alpha_c!r}: set --config.alpha_c=0.")


def check_best_metric(config: ml_collections.ConfigDict,
                      has_objects: bool) -> None:
  """Checks the run's evaluations will report `config.best_metric`.

  Args:
    config: the run config.
    has_objects: the data source's examples carry the shapes set's objects
      (`data.DataSource.has_objects`).

  Raises:
    errors.ConfigError: the metric will not be computed.
  """
  reported = metrics.metric_names(protocol=config.metrics_protocol,
                                  has_objects=has_objects)
  if config.best_metric not in reported:
    raise errors.ConfigError(
        f"config.best_metric is {config.best_metric}, which evaluations on "
        f"{config.dataset} do not report (they report "
        f"{', '.join(m for m in METRICS if m in reported)}): pick one of "
        "those for --config.best_metric.")


def check_workdir(workdir: str) -> None:
  """Creates the workdir if needed and checks it can be written.

  Raises:
    errors.ConfigError: it is a file, or it cannot be created or written.
  """
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise errors.ConfigError(f"--workdir {workdir} is a file, not a "
                             "directory: pass a directory.")
  probe = path / f".write-test-{os.getpid()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise errors.ConfigError(
        f"Cannot write to --workdir {workdir} "
        f"({e.strerror or type(e).__name__}): pass a directory you can write "
        "to.") from e


def check_resume(saved: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict, directory: str) -> None:
  """Checks a config can resume a run saved with `saved`.

  Raises:
    errors.ConfigError: a field that shapes the state differs.
  """
  changed = []
  for path in _STATE_FIELDS:
    before = _get(saved, path)
    if before != _get(config, path):
      changed.append(f"{path}={before!r} there, {_get(config, path)!r} now")
  frozen = [name for name, mult in config.lr_mults.items()
            if (mult > 0) != (saved.lr_mults.get(name, 1.0) > 0)]
  changed += [f"lr_mults.{name} freezes only one of the two" for name in frozen]
  if (config.grad_clip_norm > 0) != (saved.grad_clip_norm > 0):
    changed.append("grad_clip_norm turns clipping on in only one of the two")
  if (config.grad_clip_value > 0) != (saved.grad_clip_value > 0):
    changed.append("grad_clip_value turns clipping on in only one of the two")
  if changed:
    raise errors.ConfigError(
        f"The run in {directory} was made with another model or optimizer "
        f"structure ({'; '.join(changed)}): resume with its settings, or "
        "start a new run in another --workdir.")
