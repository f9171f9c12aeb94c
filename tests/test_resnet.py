"""Shape tests of the Flax ResNets."""

import jax
import jax.numpy as jnp
import pytest

from visionspeak_jax.models import resnet


def test_tiny_resnet_spatial_map_and_batch_stats():
  model = resnet.create("tiny", num_filters=8, stem="small")
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x)
  assert out["spatial"].shape == (2, 4, 4, 32)
  assert out["pooled"].shape == (2, 32)
  assert resnet.feature_dim("tiny", 8) == 32
  _, updates = model.apply(variables, x * 3.0, train=True,
                           mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not jnp.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("size,channels", [(18, 512), (34, 512), (50, 2048),
                                           (101, 2048), (152, 2048)])
def test_imagenet_sizes_give_7x7_at_224(size, channels):
  model = resnet.create(size)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out["spatial"].shape == (1, 7, 7, channels)
  assert resnet.feature_dim(size) == channels


def test_resnet18_runs():
  model = resnet.create(18)
  x = jnp.ones((1, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x)["spatial"].shape == (1, 2, 2, 512)


def test_unknown_size():
  with pytest.raises(ValueError, match="Unknown ResNet size"):
    resnet.create(42)
