"""Runs a frozen ResNet once over the config's splits and caches the features.

  python -m visionspeak_jax.tools.extract_features --config=configs/coco.py \
      --workdir=$HOME/sat-coco \
      --config.model.pretrained_path=$HOME/resnet101.safetensors
  python -m visionspeak_jax.main --config=configs/coco.py \
      --workdir=$HOME/sat-coco-cached --config.data_source=feature_cache \
      --config.feature_cache_dir=$HOME/sat-coco/features

The encoder comes from --config.model.pretrained_path, else from the latest
checkpoint in --workdir, else (only with --config.extract_random_encoder) a
random init. The cache goes to --config.feature_cache_dir or WORKDIR/features.
"""

from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from visionspeak_jax.platform import runtime
from visionspeak_jax.tools import extraction

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None,
                    "Run whose encoder is used; default home of the cache.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  directory = runtime.run(
      lambda: FLAGS.config,
      lambda config: extraction.extract(config, FLAGS.workdir))
  logging.info("Features written to %s.", directory)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
