"""Made-up training batches for tests: random images, ragged captions."""

import numpy as np

from visionspeak_jax.text import vocabulary as vocab_lib


def fake_batch(config, vocab_size, batch_size, seed=0):
  """`image` uint8 [B, S, S, 3] and `tokens` [B, T + 1]: BOS, words, EOS, PAD.

  Caption lengths differ, so per-device token counts differ too. The same
  seed gives the same batch in every process.
  """
  rng = np.random.RandomState(seed)
  size, length = config.image_size, config.max_caption_length + 2
  tokens = rng.randint(4, vocab_size, (batch_size, length)).astype(np.int32)
  tokens[:, 0] = vocab_lib.BOS_ID
  for i in range(batch_size):
    end = rng.randint(2, length)
    tokens[i, end] = vocab_lib.EOS_ID
    tokens[i, end + 1:] = vocab_lib.PAD_ID
  images = rng.randint(0, 256, (batch_size, size, size, 3)).astype(np.uint8)
  return {"image": images, "tokens": tokens}
