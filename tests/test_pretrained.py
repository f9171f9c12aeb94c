"""Import of torchvision-style ResNet state dicts (pretrained.py)."""

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import tiny
from visionspeak_jax.models import captioner
from visionspeak_jax.models import pretrained
from visionspeak_jax.models import resnet
from visionspeak_jax.run import restore

# torchvision's stage sizes and block kinds, written out independently of
# resnet.SIZES so a renaming on either side shows up here.
_TORCHVISION = {18: ((2, 2, 2, 2), "basic"), 50: ((3, 4, 6, 3), "bottleneck"),
                101: ((3, 4, 23, 3), "bottleneck")}


def _bn(prefix, channels):
  return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,),
          f"{prefix}.running_mean": (channels,),
          f"{prefix}.running_var": (channels,),
          f"{prefix}.num_batches_tracked": ()}


def torchvision_shapes(depth):
  """{key: shape} of torchvision.models.resnet{depth}().state_dict()."""
  stages, kind = _TORCHVISION[depth]
  expansion = 4 if kind == "bottleneck" else 1
  shapes = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
  in_ch = 64
  for i, blocks in enumerate(stages):
    width = 64 * 2**i
    for k in range(blocks):
      p = f"layer{i + 1}.{k}"
      if kind == "basic":
        convs = [(width, in_ch, 3, 3), (width, width, 3, 3)]
      else:
        convs = [(width, in_ch, 1, 1), (width, width, 3, 3),
                 (width * 4, width, 1, 1)]
      for n, shape in enumerate(convs, 1):
        shapes[f"{p}.conv{n}.weight"] = shape
        shapes.update(_bn(f"{p}.bn{n}", shape[0]))
      out_ch = width * expansion
      if k == 0 and (i > 0 or in_ch != out_ch):
        shapes[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
        shapes.update(_bn(f"{p}.downsample.1", out_ch))
      in_ch = out_ch
  shapes["fc.weight"] = (1000, in_ch)
  shapes["fc.bias"] = (1000,)
  return shapes


def timm_shapes(depth, deep_stem=False):
  """{key: shape} of a timm resnet{depth} `.safetensors` file (timm 1.0).

  timm's plain ResNet (`timm.models.resnet.ResNet`, stem_type "") names its
  modules as torchvision does: `conv1`, `bn1`, `layer{i}.{k}.conv{n}` /
  `bn{n}`, `downsample` as a Sequential of conv (0) and norm (1), and the
  `fc` head. Its files on the Hugging Face hub hold no BatchNorm counters.
  The `d` variants (resnet101d) have a deep stem: three 3x3 convolutions
  in `conv1.0`, `conv1.3`, `conv1.6` with norms at `conv1.1`, `conv1.4`.
  """
  shapes = {k: v for k, v in torchvision_shapes(depth).items()
            if not k.endswith("num_batches_tracked")}
  if deep_stem:
    del shapes["conv1.weight"]
    shapes["conv1.0.weight"] = (32, 3, 3, 3)
    shapes["conv1.3.weight"] = (32, 32, 3, 3)
    shapes["conv1.6.weight"] = (64, 32, 3, 3)
    for name in ("conv1.1", "conv1.4"):
      shapes.update({k: v for k, v in _bn(name, 32).items()
                     if not k.endswith("num_batches_tracked")})
  return shapes


def random_state_dict(depth, seed=0, naming="torchvision"):
  rng = np.random.RandomState(seed)
  state = {}
  shapes = (timm_shapes(depth) if naming == "timm"
            else torchvision_shapes(depth))
  for key, shape in shapes.items():
    if key.endswith("num_batches_tracked"):
      state[key] = np.array(7, np.int64)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[key] = rng.normal(size=shape).astype(np.float32)
  return state


@pytest.mark.parametrize("depth,naming", [
    (18, "torchvision"), (50, "torchvision"), (101, "torchvision"),
    (50, "timm"), (101, "timm")])
def test_import_covers_every_variable(depth, naming, tmp_path):
  state = random_state_dict(depth, naming=naming)
  path = str(tmp_path / f"resnet{depth}.safetensors")
  save_file(state, path)
  variables = pretrained.to_flax(pretrained.load_state_dict(path), depth)
  abstract = pretrained.abstract_variables(depth)
  got = flax.traverse_util.flatten_dict(variables)
  want = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
  assert set(got) == set(want)
  for path_, leaf in want.items():
    assert got[path_].shape == leaf.shape, path_
  # Every torchvision tensor but fc and the BN counters was used: their
  # element counts add up.
  used = sum(v.size for k, v in state.items()
             if not k.startswith("fc.") and "num_batches" not in k)
  assert sum(v.size for v in got.values()) == used
  # A specific kernel: torchvision [O, I, H, W] -> Flax [H, W, I, O].
  torch_kernel = state["layer2.0.conv2.weight"]
  flax_kernel = variables["params"]["stage2_block1"]["conv2"]["kernel"]
  np.testing.assert_array_equal(flax_kernel[1, 2, 5, 7],
                                torch_kernel[7, 5, 1, 2])
  np.testing.assert_array_equal(
      variables["params"]["stage2_block1"]["downsample_conv"]["kernel"][0, 0],
      state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(
      variables["batch_stats"]["bn_init"]["var"], state["bn1.running_var"])
  np.testing.assert_array_equal(
      variables["params"]["stage1_block1"]["bn2"]["scale"],
      state["layer1.0.bn2.weight"])


def _numpy_stem(x, state):
  """conv1 (7x7/2, pad 3) -> bn1 (inference) -> relu -> max pool 3x3/2."""
  w = state["conv1.weight"]  # [O, I, 7, 7]
  xp = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  n, h, wd, _ = x.shape
  oh, ow = (h + 6 - 7) // 2 + 1, (wd + 6 - 7) // 2 + 1
  y = np.zeros((n, oh, ow, w.shape[0]))
  for i in range(7):
    for j in range(7):
      patch = xp[:, i:i + 2 * oh:2, j:j + 2 * ow:2, :]  # [N, oh, ow, I]
      y += np.einsum("nhwi,oi->nhwo", patch, w[:, :, i, j])
  y = ((y - state["bn1.running_mean"]) /
       np.sqrt(state["bn1.running_var"] + 1e-5) * state["bn1.weight"]
       + state["bn1.bias"])
  y = np.maximum(y, 0)
  yp = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ph, pw = (oh + 2 - 3) // 2 + 1, (ow + 2 - 3) // 2 + 1
  out = np.full((n, ph, pw, y.shape[-1]), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, yp[:, i:i + 2 * ph:2, j:j + 2 * pw:2, :])
  return out


def test_imported_stem_matches_numpy(tmp_path):
  state = random_state_dict(18, seed=1)
  variables = pretrained.to_flax(state, 18)
  x = np.random.RandomState(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  out = resnet.create(18).apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(out["stem"]), _numpy_stem(x, state),
                             rtol=1e-4, atol=1e-4)
  assert out["spatial"].shape == (2, 1, 1, 512)


@pytest.mark.slow
def test_initial_weights_load_pretrained_path(tmp_path):
  state = random_state_dict(18, seed=3)
  path = str(tmp_path / "r18.safetensors")
  save_file(state, path)
  config = tiny.get_config()
  config.model.resnet_size = "18"
  config.model.resnet_width = 64
  config.model.resnet_stem = "imagenet"
  config.model.pretrained_path = path
  fresh = captioner.init(jax.random.key(0), config, vocab_size=10)
  params, batch_stats = restore.initial_weights(config, *fresh)
  np.testing.assert_array_equal(
      params["encoder"]["conv_init"]["kernel"],
      state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(batch_stats["bn_init"]["mean"],
                                state["bn1.running_mean"])
  jax.tree.map(np.testing.assert_array_equal, params["decoder"],
               fresh[0]["decoder"])


@pytest.mark.parametrize(
    "depth", ["tiny", 18, pytest.param(50, marks=pytest.mark.slow)])
def test_from_flax_inverts_to_flax(depth, tmp_path):
  variables = jax.device_get(resnet.create(depth).init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
      train=False))
  path = str(tmp_path / "encoder.safetensors")
  pretrained.save_encoder(path, variables)
  loaded = pretrained.load_encoder(path, depth)
  jax.tree.map(np.testing.assert_array_equal, loaded,
               flax.core.unfreeze(variables))
  assert pretrained.fingerprint(loaded) == pretrained.fingerprint(variables)


def test_missing_unexpected_and_wrong_shape_in_one_error():
  state = random_state_dict(18)
  del state["layer3.1.bn2.running_mean"]
  state["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
  state["layer1.0.conv2.weight"] = np.zeros((64, 64, 5, 5), np.float32)
  with pytest.raises(pretrained.PretrainedError) as e:
    pretrained.to_flax(state, 18)
  message = str(e.value)
  assert "missing: layer3.1.bn2.running_mean" in message
  assert "unexpected: layer9.0.conv1.weight" in message
  assert "wrong shape: layer1.0.conv2.weight (64, 64, 5, 5)" in message
  assert "(expected (64, 64, 3, 3))" in message
  assert message.count(".") >= 1 and "\n" not in message


def test_a_timm_deep_stem_is_named_in_the_error():
  state = {k: np.zeros(v, np.float32)
           for k, v in timm_shapes(101, deep_stem=True).items()}
  with pytest.raises(pretrained.PretrainedError) as e:
    pretrained.to_flax(state, 101)
  message = str(e.value)
  assert "deep stem" in message and "missing: conv1.weight" in message
  assert "\n" not in message


def test_resnet50_weights_do_not_fit_resnet18():
  with pytest.raises(pretrained.PretrainedError, match="ResNet-18"):
    pretrained.to_flax(random_state_dict(50), 18)


def test_file_errors(tmp_path):
  with pytest.raises(pretrained.PretrainedError, match="does not exist"):
    pretrained.load_state_dict(str(tmp_path / "nope.safetensors"))
  other = tmp_path / "weights.npz"
  other.write_bytes(b"x")
  with pytest.raises(pretrained.PretrainedError,
                     match=r"Unknown weights file type '\.npz'"):
    pretrained.load_state_dict(str(other))
  pth = tmp_path / "weights.pth"
  pth.write_bytes(b"x")
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with pytest.raises(pretrained.PretrainedError, match="needs torch"):
      pretrained.load_state_dict(str(pth))
