"""Flax linen ResNets that return the spatial feature map before pooling.

Sizes 18/34 use basic blocks, 50/101/152 bottleneck blocks (output channels
4x the stage width), as in torchvision, so a torchvision state dict maps onto
these modules one to one. "tiny" is a three-stage basic-block net for tests
and the built-in shapes run.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from visionspeak_jax.models import precision

ModuleDef = Any
# torchvision pads 3x3 convolutions by one on every side; "SAME" differs at
# stride 2, and imported weights must see the same windows.
_PAD3 = ((1, 1), (1, 1))

# "imagenet": 7x7 stride-2 conv and max pool (stride 4, as torchvision);
# "small": one 3x3 stride-2 conv, for small images.
STEMS = ("imagenet", "small")
# name -> (stage sizes, block kind)
SIZES = {
    "tiny": ((1, 1, 1), "basic"),
    "18": ((2, 2, 2, 2), "basic"),
    "34": ((3, 4, 6, 3), "basic"),
    "50": ((3, 4, 6, 3), "bottleneck"),
    "101": ((3, 4, 23, 3), "bottleneck"),
    "152": ((3, 8, 36, 3), "bottleneck"),
}


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides),
                  padding=_PAD3, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=_PAD3, name="conv2")(y)
    # Zero-init the last norm so each block starts as the identity.
    y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides),
                           name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a residual connection."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm(name="bn1")(self.conv(self.filters, (1, 1),
                                                name="conv1")(x)))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides),
                  padding=_PAD3, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1),
                           (self.strides, self.strides),
                           name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet trunk without the classifier.

  Attributes:
    stage_sizes: blocks per stage.
    block: "basic" or "bottleneck".
    num_filters: width of the first stage; each later stage doubles it.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max pool, total stride 32) or
      "small" (3x3/2 conv, no pool, total stride 2 * 2**(stages - 1)), for
      small images.
    axis_name: mapped axis for cross-device BatchNorm statistics, or None.
    dtype: computation dtype.
  """
  stage_sizes: Sequence[int]
  block: str = "basic"
  num_filters: int = 64
  stem: str = "imagenet"
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False) -> dict[str, Any]:
    """Runs the trunk.

    Args:
      x: [B, H, W, 3] normalised images.
      train: use batch statistics (and update the running ones).

    Returns:
      dict with `stem` and `stage_i` maps, `spatial` ([B, h, w, C], the
      last stage) and `pooled` ([B, C], its spatial mean).
    """
    # bfloat16 1x1 convolutions run as matmuls (`precision`); the rest, and
    # every float32 one, is `lax.conv_general_dilated`.
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype,
        conv_general_dilated=precision.conv_general_dilated)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype,
        axis_name=self.axis_name if train else None)
    block_cls: Callable[..., nn.Module] = {
        "basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
    out = {}
    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD3)
    elif self.stem == "small":
      x = conv(self.num_filters, (3, 3), (2, 2), padding=_PAD3,
               name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    else:
      raise ValueError(f"ResNet stem must be one of {STEMS}, got "
                       f"{self.stem!r}.")
    out["stem"] = x
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.num_filters * 2**i, conv=conv, norm=norm,
                      strides=strides, name=f"stage{i + 1}_block{j + 1}")(x)
      out[f"stage_{i + 1}"] = x
    out["spatial"] = x
    out["pooled"] = x.mean(axis=(1, 2))
    return out


def create(size: str | int, *, num_filters: int = 64, stem: str = "imagenet",
           axis_name: str | None = None, dtype: Any = jnp.float32) -> ResNet:
  """Builds a ResNet by name ("tiny", 18, 34, 50, 101 or 152)."""
  key = str(size)
  if key not in SIZES:
    raise ValueError(f"Unknown ResNet size {size!r}; choose one of "
                     f"{', '.join(SIZES)}.")
  stage_sizes, block = SIZES[key]
  return ResNet(stage_sizes=stage_sizes, block=block, num_filters=num_filters,
                stem=stem, axis_name=axis_name, dtype=dtype)


def feature_dim(size: str | int, num_filters: int = 64) -> int:
  """Channels C of the `spatial` map of `create(size, num_filters=...)`."""
  stage_sizes, block = SIZES[str(size)]
  width = num_filters * 2**(len(stage_sizes) - 1)
  return width * 4 if block == "bottleneck" else width
