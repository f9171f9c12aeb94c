"""Self-critical training (SCST) on the shapes set, from the default run.

Starts from a finished cross-entropy run of `configs/shapes.py` (its
decoder, encoder and vocabulary) and optimises CIDEr-D of sampled captions:

  python -m visionspeak_jax.main --config=configs/shapes.py \
      --workdir=/tmp/shapes
  python -m visionspeak_jax.main --config=configs/shapes_scst.py \
      --workdir=/tmp/shapes-scst --config.init_from=/tmp/shapes
"""

from configs import shapes


def get_config():
  """`shapes.py`'s model, five samples per image, a small constant rate."""
  config = shapes.get_config()
  config.objective = "scst"
  config.scst.num_samples = 5
  config.scst.baseline = "mean"
  # The references' cross-entropy beside the reward: content F1 fell less
  # with it (docs/scst.md).
  config.scst.xe_weight = 1.0
  config.batch_size = 16  # x 5 samples: 80 captions per step.
  config.num_train_steps = 600
  config.learning_rate = 5e-5
  config.warmup_steps = 0
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  config.log_every_steps = 50
  return config
