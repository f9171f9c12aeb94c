"""bfloat16 training (`config.dtype`): what is bfloat16, what stays float32."""

from batches import fake_batch
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoder
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib

_VOCAB = 40


def _config(dtype):
  config = tiny.get_config()
  config.model.resnet_width = 16
  config.dtype = dtype
  return config


def _loss_and_grads(config, params, batch_stats, batch):
  """The training loss (encoder in training mode) and its gradients."""

  def loss_fn(params):
    feats, _ = captioner.encode(captioner.create_encoder(config), params,
                                batch_stats, batch, train=True,
                                grid_hw=captioner.grid(config))
    inputs, targets, mask = step_lib.split_tokens(batch["tokens"])
    logits, alphas, _ = fast_decoder.teacher_forced(
        params["decoder"], feats, inputs, dtype=captioner.compute_dtype(config))
    terms = decoder.loss_terms(logits, targets, mask, alphas)
    return (terms["xent_sum"] / terms["tokens"]
            + terms["attention_sum"] / terms["captions"])

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def _relative_error_and_cosine(a, b):
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  norm = np.linalg.norm(a)
  return (np.linalg.norm(a - b) / norm,
          float(a @ b) / (norm * np.linalg.norm(b)))


def test_bfloat16_gradients_agree_with_float32():
  params, batch_stats = captioner.init(jax.random.key(0), _config("float32"),
                                       _VOCAB)
  batch = fake_batch(_config("float32"), _VOCAB, 16)
  loss32, grads32 = _loss_and_grads(_config("float32"), params, batch_stats,
                                    batch)
  loss16, grads16 = _loss_and_grads(_config("bfloat16"), params, batch_stats,
                                    batch)
  assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)
  # Gradients reach the float32 parameters as float32.
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {np.dtype("float32")}
  # bfloat16 keeps 8 bits of mantissa: the decoder's matmul inputs lose
  # about 0.4 % each; the ResNet's error grows with depth through bfloat16
  # activations. Measured on this model: decoder 1.2 %, encoder 5 %.
  error, cosine = _relative_error_and_cosine(grads32["decoder"],
                                             grads16["decoder"])
  assert error < 0.03 and cosine > 0.999, (error, cosine)
  error, cosine = _relative_error_and_cosine(grads32["encoder"],
                                             grads16["encoder"])
  assert error < 0.15 and cosine > 0.99, (error, cosine)
  # And they are not simply the float32 ones: bfloat16 did run.
  assert error > 1e-4


@pytest.mark.slow
def test_bfloat16_activations_float32_state():
  config = _config("bfloat16")
  encoder = captioner.create_encoder(config)
  variables = captioner.init_encoder(jax.random.key(0), config)
  images = jnp.zeros((2, config.image_size, config.image_size, 3))
  out, updates = encoder.apply(variables, images, train=True,
                               mutable=["batch_stats"])
  assert out["spatial"].dtype == jnp.bfloat16  # activations
  for leaf in jax.tree.leaves((variables, updates)):  # params, statistics
    assert leaf.dtype == jnp.float32
  feats, _ = captioner.encode_images(encoder, {"encoder": variables["params"]},
                                     variables["batch_stats"],
                                     np.zeros((2, 32, 32, 3), np.uint8),
                                     train=False,
                                     grid_hw=captioner.grid(config))
  assert feats.dtype == jnp.float32  # the decoder's sums stay float32

  state = state_lib.create_train_state(jax.random.key(0), config, _VOCAB)
  p_train_step, _ = step_lib.compile_steps(config)
  batch = fake_batch(config, _VOCAB, config.batch_size)
  shard = jax.tree.map(
      lambda x: x.reshape((jax.local_device_count(), -1) + x.shape[1:]),
      batch)
  new_state, metrics = p_train_step(state, shard, jax.random.key(1))
  assert bool(metrics["finite"])
  for leaf in jax.tree.leaves((new_state.params, new_state.opt_state,
                               new_state.batch_stats)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_matmul_weights_cast_and_nothing_else():
  params = decoder.init(jax.random.key(0), vocab_size=11, feature_dim=6,
                        embed_dim=5, hidden_dim=7, attention_dim=4)
  cast = flax.traverse_util.flatten_dict(
      decoder.cast_matmul_weights(params, jnp.bfloat16), sep="/")
  bf16 = sorted(k for k, v in cast.items() if v.dtype == jnp.bfloat16)
  assert bf16 == ["attention/w_f", "attention/w_h", "deep/l_h/w", "deep/l_o/w",
                  "deep/l_z/w", "gate/w", "init_c/w", "init_h/w", "lstm/w"]
  assert decoder.cast_matmul_weights(params, None) is params
