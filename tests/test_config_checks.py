"""Config mistakes end in one sentence at start-up, never in a traceback."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax.run import config_checks

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (field, bad value, what the message must say)
_BAD_VALUES = [
    ("batch_size", 0, "config.batch_size must be a whole number >= 1, got 0"),
    ("batch_size", 7, "must be divisible by the 2 devices"),
    ("eval_batch_size", 3, "divisible by the 2 local devices"),
    ("image_size", 0, "config.image_size must be a whole number >= 1"),
    ("num_train_steps", 0, "config.num_train_steps must be a whole number"),
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps must be"),
    ("eval_every_steps", 0, "config.eval_every_steps must be"),
    ("log_every_steps", -1, "config.log_every_steps must be"),
    ("beam_size", 0, "config.beam_size must be a whole number >= 1"),
    ("max_decode_length", 0, "config.max_decode_length must be"),
    ("model.hidden_dim", -3, "config.model.hidden_dim must be"),
    ("learning_rate", -1e-3, "config.learning_rate must be a number >= 0"),
    ("cpu_devices", -1, "config.cpu_devices must be a whole number >= 0"),
    ("lr_mults.encoder", -1.0, "config.lr_mults.encoder must be >= 0"),
    ("model.dropout_rate", 1.0, "config.model.dropout_rate must be in [0, 1)"),
    ("model.attention", "firm", "config.model.attention must be one of soft, "
     "hard"),
    ("hard_attention.sample_prob", 1.5,
     "config.hard_attention.sample_prob must be a number in [0, 1]"),
    ("hard_attention.reinforce_weight", -1.0,
     "config.hard_attention.reinforce_weight must be a number >= 0"),
    # The tiny config keeps the default penalty, alpha_c = 1.
    ("model.attention", "hard", "config.alpha_c must be 0 with "
     "config.model.attention='hard' (the paper's code has no doubly "
     "stochastic penalty there), got 1.0: set --config.alpha_c=0."),
    ("num_eval_examples", 0, "config.num_eval_examples must be -1"),
    ("data_source", "frozen", "config.data_source must be one of tfds, "
     "feature_cache, got 'frozen'"),
    ("decode_dtype", "float16", "config.decode_dtype must be one of"),
    ("dtype", "bf16", "config.dtype must be one of float32, bfloat16, auto, "
     "got 'bf16'"),
    ("model.gate", "sigmoid", "config.model.gate must be one of"),
    ("model.resnet_size", "19", "config.model.resnet_size must be one of"),
    ("model.resnet_stem", "big", "config.model.resnet_stem must be one of"),
    ("distributed", "maybe", "config.distributed must be one of"),
    ("best_metric", "bleu5", "config.best_metric must be one of"),
    # The tiny config scores without Java.
    ("best_metric", "meteor", "config.best_metric is meteor, which only the "
     "coco metric protocol scores, and this run scores with regex-tokens"),
    ("metrics_protocol", "ptb", "config.metrics_protocol must be one of auto, "
     "coco, regex-tokens, got 'ptb'"),
    ("init_from", "/no/such/run", "config.init_from '/no/such/run' is not a "
     "directory"),
    ("model.pretrained_path", "/no/weights.safetensors",
     "config.model.pretrained_path '/no/weights.safetensors' is not a file"),
    # A typed ConfigDict takes None for any field, but no other type.
    ("suppress_unk", None, "config.suppress_unk must be True or False, got "
     "None: fix --config.suppress_unk."),
    ("block_trigrams", None, "config.block_trigrams must be True or False"),
    ("manual_dir", None, "config.manual_dir must be a string"),
    ("min_length", -1, "config.min_length must be a whole number >= 0 and "
     "below config.max_decode_length (12), got -1"),
    # The tiny config decodes 12 tokens: 12 words would leave no EOS.
    ("min_length", 12, "config.min_length must be a whole number >= 0 and "
     "below config.max_decode_length (12), got 12"),
    ("min_length", True, "config.min_length must be a whole number"),
    ("min_length", None, "config.min_length must be a whole number"),
]


def _set(config, path, value):
  *parents, name = path.split(".")
  for parent in parents:
    config = config[parent]
  config[name] = value


def _is_one_sentence(message):
  return "\n" not in message and message.endswith(".")


def test_the_tiny_config_is_valid():
  config_checks.validate(tiny.get_config())


@pytest.mark.parametrize("path,value,says", _BAD_VALUES)
def test_bad_value_is_one_sentence(path, value, says):
  config = tiny.get_config()
  _set(config, path, value)
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate(config)
  message = str(info.value)
  assert says in message and _is_one_sentence(message), message


@pytest.mark.parametrize("metric,has_objects,says", [
    ("content_f1", False, "config.best_metric is content_f1, which "
     "evaluations on shapes_captions/tiny do not report (they report bleu1, "
     "bleu2, bleu3, bleu4, rouge_l, cider): pick one of those"),
    ("grounding", False, "config.best_metric is grounding, which"),
    ("cider", False, None),
    ("grounding", True, None),
    ("content_f1", True, None),
])
def test_best_metric_must_be_reported(metric, has_objects, says):
  config = tiny.get_config()
  config.best_metric = metric
  if says is None:
    config_checks.check_best_metric(config, has_objects)
    return
  with pytest.raises(errors.ConfigError) as info:
    config_checks.check_best_metric(config, has_objects)
  message = str(info.value)
  assert message.startswith(says) and _is_one_sentence(message), message


def test_workdir_that_is_a_file_or_cannot_be_made(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(errors.ConfigError, match="is a file, not a directory"):
    config_checks.check_workdir(str(a_file))
  with pytest.raises(errors.ConfigError,
                     match=r"Cannot write to --workdir .*/file/run \("):
    config_checks.check_workdir(str(a_file / "run"))
  config_checks.check_workdir(str(tmp_path / "new" / "run"))
  assert os.listdir(tmp_path / "new" / "run") == []


def test_resume_with_another_model_names_the_fields():
  saved, config = tiny.get_config(), tiny.get_config()
  config.model.hidden_dim = 64
  config.lr_mults.encoder = 0.0
  config.model.dropout_rate = 0.3  # Not part of the state's shapes.
  with pytest.raises(errors.ConfigError) as info:
    config_checks.check_resume(saved, config, "/runs/a")
  message = str(info.value)
  assert _is_one_sentence(message)
  assert "model.hidden_dim=32 there, 64 now" in message
  assert "lr_mults.encoder freezes only one of the two" in message
  assert "dropout" not in message and "another --workdir" in message
  config_checks.check_resume(saved, tiny.get_config(), "/runs/a")


@pytest.mark.parametrize("args,says", [
    (["--config=configs/tiny.py", "--config.no_such_field=1"],
     "error: The config has no field 'no_such_field'"),
    # Each case starts a process; the fast tier keeps one of them.
    pytest.param(["--config=configs/no_such_config.py"],
                 "error: Cannot load the --config file ([Errno 2] No such file",
                 marks=pytest.mark.slow),
    pytest.param(["--config=configs/tiny.py", "--config.batch_size=0"],
                 "error: config.batch_size must be a whole number >= 1, got 0",
                 marks=pytest.mark.slow),
    pytest.param(["--config=configs/tiny.py", "--config.cpu_devices=-2"],
                 "error: config.cpu_devices must be a whole number >= 0 (0: "
                 "one device per core), got -2", marks=pytest.mark.slow),
])
def test_main_prints_one_line_and_exits_non_zero(args, says, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "visionspeak_jax.main",
       f"--workdir={tmp_path / 'run'}", *args], cwd=_ROOT,
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(says) and _is_one_sentence(last), last
  assert "Traceback" not in proc.stderr


_NO_FILE = "[Errno 2] No such file or directory: 'configs/does_not_exist.py'"


@pytest.mark.parametrize("module,config,overrides,cause", [
    # The override reads the config while the flags are parsed, before the
    # entry point runs: it used to end in ml_collections' OSError traceback.
    ("visionspeak_jax.main", "configs/does_not_exist.py",
     ["--config.num_train_steps=4"], _NO_FILE),
    # Each case starts a process; the fast tier keeps one of them.
    pytest.param("visionspeak_jax.main", "configs/does_not_exist.py", [],
                 _NO_FILE, marks=pytest.mark.slow),
    pytest.param("visionspeak_jax.main", "configs/",
                 ["--config.num_train_steps=4", "--config.model.hidden_dim=8"],
                 "[Errno 21] Is a directory: 'configs/'",
                 marks=pytest.mark.slow),
    pytest.param("visionspeak_jax.tools.extract_features",
                 "configs/does_not_exist.py", [], _NO_FILE,
                 marks=pytest.mark.slow),
    pytest.param("visionspeak_jax.tools.extract_features",
                 "configs/does_not_exist.py", ["--config.batch_size=4"],
                 _NO_FILE, marks=pytest.mark.slow),
])
def test_a_config_file_that_fails_to_load_is_one_line(module, config,
                                                      overrides, cause,
                                                      tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", module, f"--config={config}", *overrides,
       f"--workdir={tmp_path / 'run'}"], cwd=_ROOT,
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (f"error: Cannot load the --config file ({cause}): pass an "
                  "existing config file such as configs/shapes.py."), last
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()


def test_the_coco_protocol_without_java_is_refused_at_start(monkeypatch):
  config = tiny.get_config()
  config.metrics_protocol = "coco"
  monkeypatch.setattr(config_checks.shutil, "which",
                      lambda name: f"/usr/bin/{name}")
  config_checks.validate(config)
  monkeypatch.setattr(config_checks.shutil, "which", lambda name: None)
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate(config)
  message = str(info.value)
  assert message.startswith("config.metrics_protocol is coco (the COCO "
                            "caption protocol: the PTB tokenizer and METEOR, "
                            "both on Java) but no `java` is on the PATH: ")
  assert "--config.metrics_protocol=regex-tokens" in message
  assert _is_one_sentence(message), message
  # Without Java, "auto" falls back to the marked protocol and starts.
  config.metrics_protocol = "auto"
  config_checks.validate(config)


@pytest.mark.parametrize("devices", [1, 2, 8])
def test_coco_configs_scale_with_the_accelerator_count(devices):
  from configs import coco, coco_cached, coco_finetune  # pylint: disable=g-import-not-at-top,g-multiple-import
  for module in (coco, coco_cached, coco_finetune):
    config = module.get_config(str(devices))
    assert config.batch_size == coco.PER_DEVICE_IMAGES * devices
    assert config.learning_rate == pytest.approx(
        coco.BASE_LEARNING_RATE * devices**0.5)
    # Epochs over the captions: five per image, K of them in each row group.
    captions = config.num_train_steps * config.batch_size * (
        config.captions_per_image)
    epochs = captions / (coco.TRAIN_IMAGES * coco.EPOCH_CAPTIONS_PER_IMAGE)
    assert epochs == pytest.approx(
        coco_finetune.EPOCHS if module is coco_finetune else coco.EPOCHS,
        rel=0.01)
  assert coco.get_config().batch_size == coco.get_config("8").batch_size
  recipe = coco.get_config("1")
  assert recipe.lr_mults.encoder == 0.0 and recipe.dtype == "bfloat16"
  assert recipe.model.require_pretrained
  assert coco_finetune.get_config("1").lr_mults.encoder > 0
  assert coco_cached.get_config("1").data_source == "feature_cache"


def test_a_recipe_without_pretrained_weights_stops_in_one_sentence():
  from configs import coco  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.run import restore
  config = coco.get_config("1")
  with pytest.raises(errors.UserError) as e:
    restore.check_encoder_start(config, encoder=True, init_run=None)
  message = str(e.value)
  assert message.count(". ") == 0 and message.endswith(".")
  assert "--config.model.pretrained_path=FILE" in message
  assert "--config.model.require_pretrained=False" in message
  # A feature-cache run has no encoder; an explicit override allows one.
  restore.check_encoder_start(config, encoder=False, init_run=None)
  config.model.require_pretrained = False
  restore.check_encoder_start(config, encoder=True, init_run=None)


@pytest.mark.parametrize("name", sorted(
    os.path.basename(p)[:-3] for p in glob.glob(
        os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not p.endswith("__init__.py")))
def test_every_shipped_config_passes_the_checks(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.validate(config)


@pytest.mark.parametrize("name", ["coco", "coco_14x14", "coco_cached",
                                  "coco_finetune", "coco_scst", "flickr8k",
                                  "flickr30k"])
def test_the_recipes_require_the_coco_protocol(name, monkeypatch):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.metrics_protocol == "coco"
  # Refused before anything else is read: no weights, data or workdir.
  monkeypatch.setattr(config_checks.shutil, "which", lambda name: None)
  with pytest.raises(errors.ConfigError,
                     match="^config.metrics_protocol is coco "):
    config_checks.validate(config)
