"""The recipe card (docs/recipes.md) and the recipe configs say the same.

Every `field=value` of the card's "this project" column is compared with
the config it names, at one accelerator (`configs/NAME.py:1`).
"""

import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from visionspeak_jax.training import optimizer

_CARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "docs", "recipes.md")
RECIPES = ("coco", "coco_14x14", "coco_cached", "coco_finetune", "coco_scst",
           "flickr8k", "flickr30k")
ROWS = ("encoder and grid", "image size", "frozen or fine-tuned", "batch",
        "learning rate and schedule", "epochs over captions", "dropout",
        "alpha_c", "clipping", "vocabulary rule", "max length", "beam",
        "metric protocol")
COLUMNS = ("row", "paper", "sgrvinod", "ruotianluo", "this project")
_SECTION = re.compile(r"^## .*\(`configs/(\w+)\.py`\)", re.M)
_SETTING = re.compile(r"`([a-z_.]+)=([^`]+)`")


def card_tables(text: str) -> dict[str, list[list[str]]]:
  """{config name: the rows of its section's table, cells stripped}."""
  tables = {}
  headings = [m.start() for m in re.finditer(r"^## ", text, re.M)]
  for match in _SECTION.finditer(text):
    end = min([h for h in headings if h > match.start()] + [len(text)])
    lines = [line for line in text[match.end():end].splitlines()
             if line.startswith("|")]
    tables[match.group(1)] = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in lines if not set(line) <= set("|- ")]
  return tables


def _value(config, path):
  for part in path.split("."):
    config = config[part]
  return config


def mismatches(text: str) -> list[str]:
  """Every way the card and the configs disagree, one line each."""
  problems = []
  tables = card_tables(text)
  for name in RECIPES:
    if name not in tables:
      problems.append(f"no table for configs/{name}.py")
      continue
    header, *rows = tables[name]
    if tuple(header) != COLUMNS:
      problems.append(f"{name}: columns {header}")
    if tuple(row[0] for row in rows) != ROWS:
      problems.append(f"{name}: rows {[row[0] for row in rows]}")
    config = importlib.import_module(f"configs.{name}").get_config("1")
    for row in rows:
      settings = _SETTING.findall(row[-1])
      if not settings:
        problems.append(f"{name}: row {row[0]!r} names no field=value")
      for path, literal in settings:
        # Literals and arithmetic on them only ("1/196").
        expected = eval(literal, {"__builtins__": {}})  # pylint: disable=eval-used
        try:
          actual = _value(config, path)
        except (KeyError, AttributeError):
          problems.append(f"{name}: no field {path}")
          continue
        same = (np.isclose(actual, expected, rtol=1e-12, atol=0)
                if isinstance(expected, float) else actual == expected)
        if not same or type(actual) is bool and type(expected) is not bool:
          problems.append(f"{name}: {path} is {actual!r}, the card says "
                          f"{literal}")
  return problems


def test_the_card_and_the_recipe_configs_agree():
  with open(_CARD) as f:
    assert mismatches(f.read()) == []


def test_the_check_sees_a_drift():
  with open(_CARD) as f:
    text = f.read()
  assert "`image_size=448`" in text
  drifted = text.replace("`image_size=448`", "`image_size=449`")
  assert mismatches(drifted) == [
      "coco_14x14: image_size is 448, the card says 449"]
  assert mismatches(text.replace("(`configs/flickr30k.py`)", "")) == [
      "no table for configs/flickr30k.py"]
  assert any("row 'beam' names no field=value" in p for p in mismatches(
      text.replace("3 in every evaluation: `beam_size=3`", "3")))


def test_recipes_count_epochs_over_five_captions_per_image():
  from configs import coco, coco_14x14, flickr8k  # pylint: disable=g-import-not-at-top
  for module, images, epochs in ((coco, 113_287, 20),
                                 (coco_14x14, 113_287, 20),
                                 (flickr8k, 6_000, 120)):
    config = module.get_config("1")
    rows = config.batch_size * config.captions_per_image
    assert config.num_train_steps == epochs * (images * 5 // rows)
  # More accelerators: the same epochs in fewer, larger steps.
  one, eight = coco.get_config("1"), coco.get_config("8")
  assert eight.batch_size == 8 * one.batch_size
  assert eight.num_train_steps == 20 * (113_287 // eight.batch_size)


def test_elementwise_clipping_clamps_each_gradient_element():
  config = tiny.get_config()
  config.grad_clip_norm = 0.0
  config.grad_clip_value = 0.5
  config.warmup_steps = 0
  config.num_train_steps = 100
  params = {"decoder": {"w": jnp.zeros(3)}}
  steps = [{"decoder": {"w": jnp.array([-3.0, 0.2, 7.0])}},
           {"decoder": {"w": jnp.array([0.1, -4.0, 0.3])}}]

  def run(tx):
    state, out = tx.init(params), []
    for grads in steps:
      updates, state = tx.update(grads, state, params)
      out.append(updates["decoder"]["w"])
    return np.stack(out)

  clamped = run(optimizer.create(config, ["decoder"]))
  config.grad_clip_value = 0.0
  plain = optimizer.create(config, ["decoder"])
  by_hand = run(optax.chain(optax.clip(0.5), plain))
  np.testing.assert_allclose(clamped, by_hand, rtol=1e-6)
  # Adam's second step sees the clamped magnitudes.
  assert not np.allclose(clamped, run(plain), rtol=1e-3)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_the_config_checks(name, monkeypatch):
  from visionspeak_jax.run import config_checks  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(shutil, "which", lambda cmd: "/usr/bin/" + cmd)
  config = importlib.import_module(f"configs.{name}").get_config("1")
  config.batch_size = 2 * config.batch_size  # Two fake CPU devices.
  config.eval_batch_size = 2 * config.eval_batch_size
  config_checks.validate(config)
