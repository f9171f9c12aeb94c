"""The captioner: a Flax ResNet encoder and the pure-function SAT decoder.

Parameters live in one pytree `{"encoder": ..., "decoder": ...}`; the ResNet's
BatchNorm statistics live beside it in `batch_stats`. A model trained on a
feature cache has no encoder: its parameters are `{"decoder": ...}` and its
inputs are the features themselves (see `encode`).

Initialisation here is random; weights from files or earlier runs are merged
in by `restore`.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visionspeak_jax import errors
from visionspeak_jax.models import decoder
from visionspeak_jax.models import decoding
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.models import resnet
from visionspeak_jax.platform import dtypes
from visionspeak_jax.text import vocabulary

# ImageNet statistics, in 0..255 pixel units, as torchvision uses them.
MEAN_RGB = np.array([0.485, 0.456, 0.406]) * 255.0
STDDEV_RGB = np.array([0.229, 0.224, 0.225]) * 255.0
# The names of `config.dtype` (what the ResNet and the training decoder
# compute in) and `config.decode_dtype` (the matmul inputs of greedy and beam
# decoding); None is float32. Both fields also take "auto"
# (`platform.dtypes`: bfloat16 on CPUs with AMX, float32 elsewhere).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
  """`config.dtype` as a dtype: None (float32) or bfloat16.

  bfloat16 is mixed precision: convolution and matmul inputs and the
  ResNet's activations are bfloat16; parameters, optimizer state,
  BatchNorm statistics, softmax and the loss stay float32. "auto" is this
  machine's choice (`dtypes.choose`).
  """
  return DTYPES[dtypes.name(config.dtype)]


def attention_kind(config: ml_collections.ConfigDict) -> str:
  """`config.model.attention`: "soft", or "hard" (the paper's stochastic)."""
  return config.model.attention


def decoding_attention(config: ml_collections.ConfigDict) -> str:
  """How decoding reads the regions: "soft" (alpha-weighted) or "hard".

  A hard attention run decodes as `config.hard_attention.decoding` says:
  with the expected context ("soft", the default) or with its most likely
  region ("hard"). The authors' code decodes its stochastic model with the
  expected context (kelvinxu/arctic-captions: `generate_caps.py`'s `main`
  defaults to sampling=False, and `capgen.py`'s `build_sampler` never passes
  `lstm_cond_layer` argmax=True); the argmax region is that function's
  option.
  """
  if attention_kind(config) == "soft":
    return "soft"
  return config.hard_attention.decoding


def create_encoder(config: ml_collections.ConfigDict,
                   axis_name: str | None = None) -> resnet.ResNet:
  """The ResNet named by `config.model`, computing in `config.dtype`."""
  m = config.model
  return resnet.create(m.resnet_size, num_filters=m.resnet_width,
                       stem=m.resnet_stem, axis_name=axis_name,
                       dtype=compute_dtype(config) or jnp.float32)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32, ImageNet-normalised."""
  return (images.astype(jnp.float32) - MEAN_RGB) / STDDEV_RGB


def encoder_map(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(h, w) of the ResNet's own spatial map at `config.image_size`."""
  size = config.image_size
  spatial = jax.eval_shape(
      lambda: create_encoder(config).apply(
          init_encoder(jax.random.key(0), config),
          jnp.zeros((1, size, size, 3))))["spatial"]
  return spatial.shape[1], spatial.shape[2]


def grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(h, w) of the regions the decoder attends over.

  The ResNet's map itself, or `config.model.grid` squared when that is set
  (the map is then average-pooled adaptively, `pool_to_grid`).
  """
  size = config.model.grid
  if size:
    return size, size
  return encoder_map(config)


def _pool_matrix(size: int, out: int) -> np.ndarray:
  """[out, size] averaging weights of adaptive average pooling on one axis.

  Output cell i averages input cells floor(i size / out) up to, not
  including, ceil((i + 1) size / out): the bins of torch's
  `AdaptiveAvgPool2d`, which sgrvinod's encoder (`models.py`) and
  ruotianluo's `misc/resnet_utils.py` apply to the ResNet's map. With `out`
  > `size` the bins overlap and cells repeat.
  """
  weights = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -((-(i + 1) * size) // out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def pool_to_grid(spatial: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """[B, h, w, C] -> [B, gh, gw, C], adaptive average pooling.

  The map is returned as it is when it already has the grid's shape, so a
  grid equal to the ResNet's map computes exactly what no grid does.
  """
  _, h, w, _ = spatial.shape
  gh, gw = grid_hw
  if (h, w) == (gh, gw):
    return spatial
  rows = jnp.asarray(_pool_matrix(h, gh))  # [gh, h]
  cols = jnp.asarray(_pool_matrix(w, gw))  # [gw, w]
  # Two small contractions in float32: a sum of at most a few cells each.
  return jnp.einsum("ih,jw,bhwc->bijc", rows, cols,
                    spatial.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


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
  """Randomly initialised encoder variables {"params", "batch_stats"}."""
  size = config.image_size
  return create_encoder(config).init(key, jnp.zeros((1, size, size, 3)),
                                     train=False)


def init(key: jax.Array, config: ml_collections.ConfigDict, vocab_size: int,
         *, encoder: bool = True) -> tuple[dict[str, Any], Any]:
  """Creates random (params, batch_stats) for a config and vocabulary size.

  Args:
    key: PRNG key; the decoder's key is the same with or without encoder.
    config: the run config.
    vocab_size: V.
    encoder: include the ResNet; False for a model that reads features from
      a cache (`params` is then `{"decoder": ...}`, `batch_stats` empty).

  Returns:
    (params, batch_stats).
  """
  k_enc, k_dec = jax.random.split(key)
  params = {"decoder": init_decoder(k_dec, config, vocab_size,
                                    num_regions(config))}
  if not encoder:
    return params, {}
  variables = init_encoder(k_enc, config)
  return {"encoder": variables["params"], **params}, variables["batch_stats"]


def encode_images(encoder: resnet.ResNet, params: dict[str, Any],
                  batch_stats: Any, images: jax.Array, train: bool, *,
                  grid_hw: tuple[int, int]) -> tuple[jax.Array, Any]:
  """Images to region features.

  Args:
    encoder: the ResNet module.
    params: the full parameter pytree.
    batch_stats: BatchNorm statistics.
    images: [B, H, W, 3] uint8.
    train: use and update batch statistics.
    grid_hw: the regions' (h, w), `grid(config)`; the ResNet's map is
      pooled to it (kept as it is when it has that shape).

  Returns:
    (features [B, R, C] float32, new batch_stats; unchanged unless
    `train`).
  """
  variables = {"params": params["encoder"], "batch_stats": batch_stats}
  x = normalize_images(images)
  if train:
    out, updates = encoder.apply(variables, x, train=True,
                                 mutable=["batch_stats"])
    batch_stats = updates["batch_stats"]
  else:
    out = encoder.apply(variables, x, train=False)
  # float32 whatever the ResNet computed in: the decoder casts its matmul
  # inputs itself, and its sums over regions stay float32.
  spatial = out["spatial"].astype(jnp.float32)
  spatial = pool_to_grid(spatial, grid_hw)  # [B, h, w, C] -> [B, gh, gw, C]
  b, h, w, c = spatial.shape
  return spatial.reshape(b, h * w, c), batch_stats  # [B, h, w, C] -> [B, R, C]


def encode(encoder: resnet.ResNet, params: dict[str, Any], batch_stats: Any,
           inputs: dict[str, jax.Array], *, train: bool,
           grid_hw: tuple[int, int]) -> tuple[jax.Array, Any]:
  """Model inputs to region features, whatever the data source gave.

  Args:
    encoder: the ResNet module.
    params: the full parameter pytree.
    batch_stats: BatchNorm statistics.
    inputs: `image` uint8 [B, S, S, 3], encoded by the ResNet, or
      `features` [B, R, C] from a feature cache, used as they are.
    train: run the ResNet in training mode (batch statistics, updated).
    grid_hw: the regions' (h, w), `grid(config)`, which images are pooled
      to; cached features already have it.

  Returns:
    (features [B, R, C] float32, batch_stats).
  """
  if "features" in inputs:
    return inputs["features"].astype(jnp.float32), batch_stats
  return encode_images(encoder, params, batch_stats, inputs["image"],
                       train=train, grid_hw=grid_hw)


def decode_dtype(name: str) -> Any:
  """A `decode_dtype` name as a matmul dtype (None for float32).

  "auto" is this machine's choice (`dtypes.choose`).

  Raises:
    errors.ConfigError: for a name other than "float32", "bfloat16" or
      "auto".
  """
  name = dtypes.name(name)
  if name not in DTYPES:
    raise errors.ConfigError(
        f"decode_dtype must be one of {sorted(DTYPES) + [dtypes.AUTO]}, got "
        f"{name!r}.")
  return DTYPES[name]


_decoding_weights = jax.jit(fast_decoder.decoding_weights,
                            static_argnums=(1, 2))


def decoding_weights(decoder_params: dict[str, Any], dtype_name: str,
                     attention: str = "soft"
                     ) -> fast_decoder.DecodingWeights:
  """`fast_decoder.decoding_weights` for a `decode_dtype` name, jitted.

  Build once per checkpoint (an evaluation pass, the caption CLI) and pass
  to `make_step_fn`, `greedy_caption` or `beam_caption` for every batch.

  Args:
    decoder_params: the decoder's parameters.
    dtype_name: `decode_dtype`, "float32" or "bfloat16".
    attention: `decoding_attention(config)`; "hard" decodes with the most
      likely region.

  Raises:
    errors.ConfigError: for an unknown `dtype_name`.
  """
  return _decoding_weights(decoder_params, decode_dtype(dtype_name),
                           attention)


def make_step_fn(weights: fast_decoder.DecodingWeights, features: jax.Array
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
  features, features_proj, state = fast_decoder.decoding_start(weights,
                                                                features)

  def step_fn(tokens, carry):
    return fast_decoder.decode_step(weights, features, features_proj, carry,
                                    tokens)

  return step_fn, state


def constraints(config: ml_collections.ConfigDict, *,
                suppress_unk: bool | None = None,
                block_trigrams: bool | None = None,
                min_length: int | None = None) -> decoding.Constraints:
  """The run's decoding constraints, as its config's fields ask.

  `config.suppress_unk` forbids <unk>, `config.block_trigrams` a repeated
  trigram and `config.min_length` an EOS before that many words.

  Args:
    config: the run config.
    suppress_unk: overrides the config's field when given.
    block_trigrams: overrides the config's field when given.
    min_length: overrides the config's field when given.

  Returns:
    A hashable `decoding.Constraints`, to pass to `predict`.
  """
  if suppress_unk is None:
    suppress_unk = config.suppress_unk
  if block_trigrams is None:
    block_trigrams = config.block_trigrams
  if min_length is None:
    min_length = config.min_length
  return decoding.Constraints(
      suppress_ids=(vocabulary.UNK_ID,) if suppress_unk else (),
      min_length=min_length, block_trigrams=bool(block_trigrams))


def greedy_caption(weights: fast_decoder.DecodingWeights, features: jax.Array,
                   max_length: int,
                   constraints: decoding.Constraints = decoding.Constraints()
                   ) -> decoding.Decoded:
  """Greedy captions for [B, R, C] features (`make_step_fn`'s weights).

  `constraints` are words never picked; default none.
  """
  step_fn, state = make_step_fn(weights, features)
  return decoding.greedy(step_fn, state, features.shape[0], max_length,
                         bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID,
                         pad_id=vocabulary.PAD_ID, constraints=constraints)


def beam_caption(weights: fast_decoder.DecodingWeights, features: jax.Array, *,
                 beam_size: int, max_length: int,
                 length_penalty: float = 0.0,
                 constraints: decoding.Constraints = decoding.Constraints()
                 ) -> decoding.Decoded:
  """Beam-search captions for [B, R, C] features (beam_size 1 is greedy).

  `weights` are `make_step_fn`'s; `constraints` are words never picked,
  default none.
  """
  if beam_size <= 1:
    return greedy_caption(weights, features, max_length, constraints)
  step_fn, state = make_step_fn(weights, features)
  return decoding.beam_search(
      step_fn, state, features.shape[0], beam_size, max_length,
      bos_id=vocabulary.BOS_ID, eos_id=vocabulary.EOS_ID,
      pad_id=vocabulary.PAD_ID, length_penalty=length_penalty,
      constraints=constraints)


def predict(params: dict[str, Any], batch_stats: Any,
            weights: fast_decoder.DecodingWeights,
            inputs: dict[str, jax.Array], *,
            config: ml_collections.ConfigDict, beam_size: int,
            max_length: int, length_penalty: float = 0.0,
            constraints: decoding.Constraints = decoding.Constraints()
            ) -> decoding.Decoded:
  """Captions a batch: encoder (inference mode), then beam search.

  The one prediction function: evaluation compiles it with `jax.pmap`, the
  caption CLI with `jax.jit`.

  Args:
    params: the model parameters.
    batch_stats: BatchNorm statistics.
    weights: `decoding_weights` of `params["decoder"]`, built once per
      checkpoint.
    inputs: `image` [B, S, S, 3] uint8 or `features` [B, R, C].
    config: the run config (the encoder's settings).
    beam_size: hypotheses per image; 1 is greedy.
    max_length: generated tokens at most (EOS included).
    length_penalty: GNMT exponent of the beam search.
    constraints: words never picked (`constraints(config)` gives the run's);
      default none.

  Returns:
    The `Decoded` captions and attention maps.
  """
  feats, _ = encode(create_encoder(config), params, batch_stats, inputs,
                    train=False, grid_hw=grid(config))  # [B, R, C]
  return beam_caption(weights, feats, beam_size=beam_size,
                      max_length=max_length, length_penalty=length_penalty,
                      constraints=constraints)


def compile_predict(config: ml_collections.ConfigDict,
                    devices: list[jax.Device] | None = None
                    ) -> Callable[..., Any]:
  """`predict` with the config's decoding settings, pmapped.

  Args:
    config: the run config: `beam_size`, `max_decode_length`,
      `length_penalty` and the decoding constraints.
    devices: the local devices to map over (default: all).

  Returns:
    p_predict(params, batch_stats, decoding weights, inputs), with inputs
    sharded over the devices: [devices, B / devices, ...].
  """
  return jax.pmap(
      functools.partial(predict, config=config, beam_size=config.beam_size,
                        max_length=config.max_decode_length,
                        length_penalty=config.length_penalty,
                        constraints=constraints(config)),
      axis_name="batch", in_axes=(None, None, None, 0), out_axes=0,
      devices=devices)
