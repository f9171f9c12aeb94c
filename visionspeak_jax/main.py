"""Trains and evaluates the captioner.

  python -m visionspeak_jax.main --config=configs/shapes.py \
      --workdir=/tmp/shapes
  python -m visionspeak_jax.main --config=configs/coco.py --workdir=DIR \
      --config.batch_size=64
"""

from visionspeak_jax.platform import cpu_tuning

if __name__ == "__main__":  # First, before JAX: this may start it again.
  cpu_tuning.reexec(__file__)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from visionspeak_jax import train
from visionspeak_jax.platform import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  runtime.run(lambda: FLAGS.config,
              lambda config: train.train_and_evaluate(config, FLAGS.workdir))


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
