"""The captioner: a Flax ResNet encoder and the pure-function SAT decoder.

Parameters live in one pytree `{"encoder": ..., "decoder": ...}`; the ResNet's
BatchNorm statistics live beside it in `batch_stats`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visionspeak_jax import decoder
from visionspeak_jax import decoding
from visionspeak_jax import pretrained
from visionspeak_jax import resnet
from visionspeak_jax import vocabulary

# ImageNet statistics, in 0..255 pixel units, as torchvision uses them.
MEAN_RGB = np.array([0.485, 0.456, 0.406]) * 255.0
STDDEV_RGB = np.array([0.229, 0.224, 0.225]) * 255.0
# `config.decode_dtype`: the matmul input dtype of greedy and beam decoding.
DECODE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def create_encoder(config: ml_collections.ConfigDict,
                   axis_name: str | None = None) -> resnet.ResNet:
  """The ResNet named by `config.model`."""
  m = config.model
  return resnet.create(m.resnet_size, num_filters=m.resnet_width,
                       stem=m.resnet_stem, axis_name=axis_name)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32, ImageNet-normalised."""
  return (images.astype(jnp.float32) - MEAN_RGB) / STDDEV_RGB


def grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(h, w) of the encoder's spatial map at `config.image_size` (shapes only)."""
  encoder = create_encoder(config)
  size = config.image_size
  spatial = jax.eval_shape(
      lambda: encoder.apply(
          encoder.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                       train=False),
          jnp.zeros((1, size, size, 3))))["spatial"]
  return spatial.shape[1], spatial.shape[2]


def num_regions(config: ml_collections.ConfigDict) -> int:
  """R = h * w, the regions of the encoder's spatial map."""
  h, w = grid(config)
  return h * w


def init_decoder(key: jax.Array, config: ml_collections.ConfigDict,
                 vocab_size: int, regions: int) -> dict[str, Any]:
  """Decoder parameters for features of `config.model`'s ResNet."""
  m = config.model
  return decoder.init(
      key, vocab_size=vocab_size,
      feature_dim=resnet.feature_dim(m.resnet_size, m.resnet_width),
      embed_dim=m.embed_dim, hidden_dim=m.hidden_dim,
      attention_dim=m.attention_dim, gate=m.gate, deep_output=m.deep_output,
      num_regions=regions if m.position_embedding else 0)


def init_encoder(key: jax.Array, config: ml_collections.ConfigDict
                 ) -> dict[str, Any]:
  """Encoder variables {"params", "batch_stats"}: random, or imported.

  With `config.model.pretrained_path` set, the weights come from that
  torchvision-style state dict (see `pretrained.py`); `key` is then unused.
  """
  m = config.model
  # Under tracing (jax.eval_shape while restoring a checkpoint) only shapes
  # matter: they are those of a random init, and the file need not exist.
  if m.get("pretrained_path", "") and not isinstance(key, jax.core.Tracer):
    return pretrained.load_encoder(m.pretrained_path, m.resnet_size,
                                   num_filters=m.resnet_width,
                                   stem=m.resnet_stem)
  size = config.image_size
  return create_encoder(config).init(key, jnp.zeros((1, size, size, 3)),
                                     train=False)


def init(key: jax.Array, config: ml_collections.ConfigDict,
         vocab_size: int) -> tuple[dict[str, Any], Any]:
  """Creates (params, batch_stats) for a config and vocabulary size."""
  k_enc, k_dec = jax.random.split(key)
  variables = init_encoder(k_enc, config)
  params = {
      "encoder": variables["params"],
      "decoder": init_decoder(k_dec, config, vocab_size, num_regions(config)),
  }
  return params, variables["batch_stats"]


def encode(encoder: resnet.ResNet, params: dict[str, Any], batch_stats: Any,
           images: jax.Array, train: bool) -> tuple[jax.Array, Any]:
  """Images to region features.

  Args:
    encoder: the ResNet module.
    params: the full parameter pytree.
    batch_stats: BatchNorm statistics.
    images: [B, H, W, 3] uint8.
    train: use and update batch statistics.

  Returns:
    (features [B, R, C], new batch_stats; unchanged unless `train`).
  """
  variables = {"params": params["encoder"], "batch_stats": batch_stats}
  x = normalize_images(images)
  if train:
    out, updates = encoder.apply(variables, x, train=True,
                                 mutable=["batch_stats"])
    batch_stats = updates["batch_stats"]
  else:
    out = encoder.apply(variables, x, train=False)
  spatial = out["spatial"]
  b, h, w, c = spatial.shape
  return spatial.reshape(b, h * w, c), batch_stats  # [B, h, w, C] -> [B, R, C]


def decode_dtype(name: str) -> Any:
  """A `decode_dtype` name as a matmul dtype (None for float32).

  Raises:
    ValueError: for a name other than "float32" or "bfloat16".
  """
  if name not in DECODE_DTYPES:
    raise ValueError(f"decode_dtype must be one of {sorted(DECODE_DTYPES)}, "
                     f"got {name!r}.")
  return DECODE_DTYPES[name]


_decoding_weights = jax.jit(decoder.decoding_weights, static_argnums=1)


def decoding_weights(decoder_params: dict[str, Any],
                     dtype_name: str) -> dict[str, Any]:
  """`decoder.decoding_weights` for a `decode_dtype` name, jitted.

  Build once per checkpoint (an evaluation pass, the caption CLI) and pass
  to `make_step_fn`, `greedy_caption` or `beam_caption` for every batch.

  Raises:
    ValueError: for an unknown `dtype_name`.
  """
  return _decoding_weights(decoder_params, decode_dtype(dtype_name))


def make_step_fn(weights: dict[str, Any], features: jax.Array
                 ) -> tuple[decoding.StepFn, Any]:
  """A `decoding` step function and its initial state for some images.

  The features are projected here, once per image, not inside the step.
  The step function takes K rows per image (K = rows / B: 1 for greedy or
  sampling, the beam width for beam search), which all read one copy of
  the image's features.

  Args:
    weights: `decoding_weights(...)`, built once per checkpoint.
    features: [B, R, C] region features.

  Returns:
    (step_fn over [B * K] tokens, initial state with leading dim B).
  """
  features = decoder.add_positions(weights, features)
  state = decoder.init_state(weights, features)
  features_proj = decoder.project_features(weights, features)

  def step_fn(tokens, carry):
    return decoder.decode_step(weights, features, features_proj, carry,
                               tokens)

  return step_fn, state


def greedy_caption(weights: dict[str, Any], features: jax.Array,
                   max_length: int) -> decoding.Decoded:
  """Greedy captions for [B, R, C] features (`make_step_fn`'s weights)."""
  step_fn, state = make_step_fn(weights, features)
  return decoding.greedy(step_fn, state, features.shape[0], max_length,
                         bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID,
                         pad_id=vocabulary.PAD_ID)


def beam_caption(weights: dict[str, Any], features: jax.Array, *,
                 beam_size: int, max_length: int,
                 length_penalty: float = 0.0) -> decoding.Decoded:
  """Beam-search captions for [B, R, C] features (beam_size 1 is greedy).

  `weights` are `make_step_fn`'s.
  """
  if beam_size <= 1:
    return greedy_caption(weights, features, max_length)
  step_fn, state = make_step_fn(weights, features)
  return decoding.beam_search(
      step_fn, state, features.shape[0], beam_size, max_length,
      bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID,
      pad_id=vocabulary.PAD_ID, length_penalty=length_penalty)
