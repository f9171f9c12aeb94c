"""Imports torchvision-style ResNet state dicts into the Flax ResNet.

A torchvision ResNet names its tensors `conv1`, `bn1`, `layer{i}.{k}.conv{n}`,
`layer{i}.{k}.bn{n}`, `layer{i}.{k}.downsample.{0,1}` and `fc`; the Flax ResNet
in `resnet.py` mirrors that layout one to one (`conv_init`, `bn_init`,
`stage{i}_block{k+1}/conv{n}`, ...), so the import is a renaming plus the
conv-kernel transpose OIHW -> HWIO.

  variables = to_flax(load_state_dict("resnet50.safetensors"), "50")
  # {"params": ..., "batch_stats": ...} for resnet.create("50").
"""

import hashlib
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from visionspeak_jax import errors
from visionspeak_jax.models import resnet

# torchvision keys that have no counterpart in a classifier-free trunk.
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_PREFIXES = ("fc.",)
# Problems listed per kind in an error; the rest are counted.
_MAX_LISTED = 5


class PretrainedError(errors.UserError):
  """A weights file that cannot be imported, with what to do about it."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision-style state dict as numpy arrays.

  Args:
    path: a `.safetensors` file, or a `.pth` / `.pt` file (needs torch).

  Returns:
    {torchvision key: array}.

  Raises:
    PretrainedError: the file is missing, has an unknown extension, or is a
      torch file and torch is not installed.
  """
  if not os.path.isfile(path):
    raise PretrainedError(f"Pretrained weights file {path} does not exist: fix "
                          "--config.model.pretrained_path.")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  if ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise PretrainedError(
          f"Reading {path} needs torch: `pip install torch`, or convert it "
          "once to .safetensors (safetensors.torch.save_file) and pass that "
          "file.") from e
    state = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(state, dict) and "state_dict" in state:
      state = state["state_dict"]
    return {k: v.detach().float().numpy() if v.is_floating_point()
            else v.numpy() for k, v in state.items()}
  raise PretrainedError(f"Unknown weights file type {ext or '(none)'!r} of "
                        f"{path}: pass a .safetensors, .pth or .pt file.")


def _torch_key(flax_path: tuple[str, ...]) -> tuple[str, bool]:
  """Flax module path (without the leaf) -> (torchvision prefix, is_conv)."""
  first = flax_path[0]
  if first == "conv_init":
    return "conv1", True
  if first == "bn_init":
    return "bn1", False
  # "stage{i}_block{j}" -> "layer{i}.{j - 1}"
  stage, block = first.split("_")
  prefix = f"layer{stage[len('stage'):]}.{int(block[len('block'):]) - 1}"
  layer = flax_path[1]
  if layer == "downsample_conv":
    return f"{prefix}.downsample.0", True
  if layer == "downsample_bn":
    return f"{prefix}.downsample.1", False
  return f"{prefix}.{layer}", layer.startswith("conv")


# (flax collection, flax leaf) -> torchvision suffix.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def abstract_variables(resnet_size: str | int, num_filters: int = 64,
                       stem: str = "imagenet") -> dict[str, Any]:
  """Shapes of the Flax ResNet's variables, without computing anything."""
  model = resnet.create(resnet_size, num_filters=num_filters, stem=stem)
  # Kernel shapes do not depend on the image size; 64 px keeps every stage.
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                         train=False))


def to_flax(state_dict: dict[str, Any], resnet_size: str | int, *,
            num_filters: int = 64, stem: str = "imagenet") -> dict[str, Any]:
  """Maps a torchvision ResNet state dict onto `resnet.create(resnet_size)`.

  Args:
    state_dict: {torchvision key: array}, e.g. from `load_state_dict`.
    resnet_size: "18", "34", "50", "101" or "152".
    num_filters: the Flax ResNet's first-stage width (torchvision: 64).
    stem: the Flax ResNet's stem (torchvision: "imagenet").

  Returns:
    {"params": ..., "batch_stats": ...} float32 numpy trees for the encoder.

  Raises:
    PretrainedError: keys are missing, unexpected, or of the wrong shape
      (all of them listed in one message).
  """
  abstract = flax.core.unfreeze(
      abstract_variables(resnet_size, num_filters, stem))
  flat = flax.traverse_util.flatten_dict(abstract)
  used, missing, mismatched = set(), [], []
  out = {}
  for path, leaf in flat.items():
    collection, *modules, name = path
    prefix, is_conv = _torch_key(tuple(modules))
    key = f"{prefix}.{_LEAVES[(collection, name)]}"
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state_dict[key], dtype=np.float32)
    if is_conv and name == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if value.shape != tuple(leaf.shape):
      expected = (tuple(leaf.shape[i] for i in (3, 2, 0, 1)) if is_conv
                  else tuple(leaf.shape))
      mismatched.append(f"{key} {tuple(np.shape(state_dict[key]))} "
                        f"(expected {expected})")
      continue
    out[path] = value
  unexpected = sorted(
      k for k in state_dict if k not in used
      and not k.startswith(_IGNORED_PREFIXES)
      and not k.endswith(_IGNORED_SUFFIXES))
  problems = []
  for what, keys in (("missing", sorted(missing)), ("unexpected", unexpected),
                     ("wrong shape", mismatched)):
    if keys:
      listed = ", ".join(keys[:_MAX_LISTED])
      more = (f" and {len(keys) - _MAX_LISTED} more"
              if len(keys) > _MAX_LISTED else "")
      problems.append(f"{what}: {listed}{more}")
  if problems:
    # timm's "c"/"d"/"s" variants replace the 7x7 stem conv by a Sequential.
    deep_stem = any(k.startswith("conv1.0.") for k in state_dict)
    raise PretrainedError(
        f"The weights do not fit ResNet-{resnet_size} (width {num_filters}, "
        f"{stem} stem) ({'; '.join(problems)}): pass a torchvision or plain "
        f"timm resnet{resnet_size} state dict"
        + (" (timm's deep stem variants such as resnet101d have no "
           "counterpart here)" if deep_stem else "")
        + " or set --config.model.resnet_size to match it.")
  return flax.traverse_util.unflatten_dict(out)


def from_flax(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `to_flax`: Flax ResNet variables -> torchvision keys.

  Args:
    variables: {"params", "batch_stats"} of a `resnet.create(...)` model.

  Returns:
    {torchvision key: float32 array}, without `fc` (the trunk has none).
  """
  out = {}
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  for (collection, *modules, name), value in flat.items():
    prefix, is_conv = _torch_key(tuple(modules))
    value = np.asarray(jax.device_get(value), np.float32)
    if is_conv and name == "kernel":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    out[f"{prefix}.{_LEAVES[(collection, name)]}"] = np.ascontiguousarray(
        value)
  return out


def save_encoder(path: str, variables: dict[str, Any]) -> None:
  """Writes encoder variables as a torchvision-style `.safetensors` file."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(from_flax(variables), path)


def load_encoder(path: str, resnet_size: str | int, *, num_filters: int = 64,
                 stem: str = "imagenet") -> dict[str, Any]:
  """`to_flax(load_state_dict(path), ...)`."""
  return to_flax(load_state_dict(path), resnet_size, num_filters=num_filters,
                 stem=stem)


def fingerprint(variables: Any) -> str:
  """A short hash of a pytree's leaf names, shapes and values."""
  digest = hashlib.sha256()
  for path, leaf in sorted(
      ((jax.tree_util.keystr(p), v) for p, v in
       jax.tree_util.tree_flatten_with_path(variables)[0]),
      key=lambda item: item[0]):
    value = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    digest.update(f"{path}:{value.dtype}:{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]
