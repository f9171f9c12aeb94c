"""karpathy_captions: Karpathy's caption files and images, built with TFDS.

Small sets in every config's layout are written to tmp dirs (JPEGs drawn
with numpy and PIL, and the JSON) and built through `get_builder`, as a
run does.
"""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import flickr30k
from configs import flickr8k
from configs import tiny
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.data.datasets import karpathy

# Images per split of the small sets.
_SIZES = {"train": 3, "val": 2, "test": 2}
_COCO_SIZES = {"train": 2, "val": 1, "test": 1, "restval": 1}
_WORDS = ("dog", "cat", "runs", "on", "grass", "a", "the", "red", "ball")


def _config(tmp_path, name):
  config = tiny.get_config()
  config.dataset = f"karpathy_captions/{name}"
  config.data_dir = str(tmp_path / "data")
  config.manual_dir = str(tmp_path / "manual")
  config.eval_split = "val"
  return config


def _captions(index):
  rng = np.random.default_rng(index)
  return [" ".join(rng.choice(_WORDS, 5)).capitalize() + "."
          for _ in range(2 + index % 2)]


def _write_image(path, index, fmt="jpeg"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(100 + index)
  pixels = rng.integers(0, 256, (12 + index, 16, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


def _write_set(manual, name, sizes=None):
  """A small set in the layout of config `name`; returns the JSON entries."""
  sizes = sizes or (_COCO_SIZES if name == "coco" else _SIZES)
  folder = {"flickr8k": "Flicker8k_Dataset", "flickr30k": "flickr30k-images",
            "custom": "images"}.get(name)
  entries = []
  for split, count in sizes.items():
    for _ in range(count):
      index = len(entries)
      entry = {"split": split, "sentences": [
          {"raw": text, "tokens": text.lower().split()}
          for text in _captions(index)]}
      if name == "coco":
        year = "train2014" if split == "train" else "val2014"
        entry.update(filepath=year, cocoid=1000 + index,
                     filename=f"COCO_{year}_{1000 + index:012d}.jpg")
        path = os.path.join(manual, year, entry["filename"])
      elif name == "custom" and index == 1:
        # An entry's filepath names its folder, and PNGs are fine.
        entry.update(filepath="more", filename="picture.png")
        path = os.path.join(manual, "more", "picture.png")
      else:
        entry["filename"] = f"{index}.jpg"
        path = os.path.join(manual, folder, entry["filename"])
        if name != "custom":
          entry["imgid"] = 10 + index
      _write_image(path, index, "png" if path.endswith(".png") else "jpeg")
      entries.append(entry)
  json_name = karpathy.KarpathyCaptions.builder_configs[name].json_name
  with open(os.path.join(manual, json_name), "w") as f:
    json.dump({"images": entries, "dataset": name}, f)
  return entries


def _expected_id(name, index, entry):
  return entry.get("cocoid", entry.get("imgid", index))


@pytest.mark.parametrize("name", ["flickr8k", "flickr30k", "coco", "custom"])
def test_each_layout_builds_with_coco_captions_features(tmp_path, name):
  config = _config(tmp_path, name)
  entries = _write_set(config.manual_dir, name)
  builder = input_pipeline.get_builder(config)
  assert builder.is_prepared()
  expected_splits = [s for s in karpathy.SPLITS
                     if any(e["split"] == s for e in entries)]
  assert list(builder.info.splits) == expected_splits
  # coco_captions/2014's features but its objects, key for key.
  coco = tfds.builder("coco_captions/2014", data_dir=str(tmp_path / "coco"))
  features, coco_features = builder.info.features, coco.info.features
  assert set(features) == set(coco_features) - {"objects"}
  for key in features:
    assert repr(features[key]) == repr(coco_features[key]), key
    assert (features[key].get_serialized_info()
            == coco_features[key].get_serialized_info()), key
  assert not input_pipeline.TfdsSource(config).has_objects
  by_id = {_expected_id(name, i, e): e for i, e in enumerate(entries)}
  for split in expected_splits:
    seen = []
    for ex in tfds.as_numpy(builder.as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})):
      entry = by_id[int(ex["image/id"])]
      assert entry["split"] == split
      assert ex["image/filename"].decode() == entry["filename"]
      assert [t.decode() for t in ex["captions"]["text"]] == [
          s["raw"] for s in entry["sentences"]]
      image = Image.open(io.BytesIO(ex["image"]))
      assert image.format == "JPEG" and image.mode == "RGB"  # PNG re-encoded.
      seen.append(int(ex["image/id"]))
    assert len(seen) == builder.info.splits[split].num_examples
    assert sorted(seen) == sorted(i for i, e in by_id.items()
                                  if e["split"] == split)
  # Caption ids are unique across the set.
  ids = [int(i) for split in expected_splits for ex in tfds.as_numpy(
      builder.as_dataset(split=split,
                         decoders={"image": tfds.decode.SkipDecoding()}))
         for i in ex["captions"]["id"]]
  assert len(ids) == len(set(ids)) == sum(len(e["sentences"])
                                          for e in entries)


def test_decoded_images_are_the_files_pixels(tmp_path):
  config = _config(tmp_path, "custom")
  _write_set(config.manual_dir, "custom", {"train": 1})
  builder = input_pipeline.get_builder(config)
  (ex,) = tfds.as_numpy(builder.as_dataset(split="train"))
  with Image.open(os.path.join(config.manual_dir, "images", "0.jpg")) as f:
    expected = np.asarray(f.convert("RGB"), np.int16)
  assert ex["image"].shape == expected.shape
  # TensorFlow's and PIL's JPEG decoders differ by a few levels at most.
  assert np.abs(ex["image"].astype(np.int16) - expected).max() <= 8


def _edit_json(edit):
  def apply(manual, json_path):
    del manual
    with open(json_path) as f:
      data = json.load(f)
    edit(data)
    with open(json_path, "w") as f:
      json.dump(data, f)
  return apply


def _write(text):
  def apply(manual, json_path):
    del manual
    with open(json_path, "w") as f:
      f.write(text)
  return apply


def _remove_json(manual, json_path):
  del manual
  os.remove(json_path)


def _remove_images(*names):
  def apply(manual, json_path):
    del json_path
    for name in names:
      os.remove(os.path.join(manual, "Flicker8k_Dataset", name))
  return apply


def _truncate_image(manual, json_path):
  del json_path
  path = os.path.join(manual, "Flicker8k_Dataset", "4.jpg")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _not_an_image(manual, json_path):
  del json_path
  with open(os.path.join(manual, "Flicker8k_Dataset", "0.jpg"), "w") as f:
    f.write("not a picture")


def _drop_split(split):
  def edit(data):
    data["images"] = [e for e in data["images"] if e["split"] != split]
  return _edit_json(edit)


def _drop_key(index, key):
  def edit(data):
    del data["images"][index][key]
  return _edit_json(edit)


def _set_key(index, key, value):
  def edit(data):
    data["images"][index][key] = value
  return _edit_json(edit)


# (case, how the small flickr8k set is broken, what the message must say)
_BAD_INPUTS = [
    ("no json", _remove_json,
     "No caption file {manual}/dataset_flickr8k.json: put "
     "dataset_flickr8k.json (from Karpathy's caption_datasets.zip) in "
     "{manual}, or point --config.manual_dir at the folder that holds it."),
    ("not json", _write("{images: oops"),
     "{manual}/dataset_flickr8k.json is not a JSON file ("),
    ("no images list", _write('{"dataset": "flickr8k"}'),
     "{manual}/dataset_flickr8k.json is not in Karpathy's format: it has no "
     "'images' list; see docs/your_own_data.md."),
    ("empty images list", _write('{"images": []}'),
     "{manual}/dataset_flickr8k.json lists no images"),
    ("entry without filename", _drop_key(2, "filename"),
     "is not in Karpathy's format: images[2] has no 'filename'; see "),
    ("entry without split", _drop_key(2, "split"),
     "is not in Karpathy's format: images[2] (2.jpg) has no 'split'; see "),
    ("unknown split", _set_key(2, "split", "training"),
     "images[2] (2.jpg) has split 'training', not one of train, val, test, "
     "restval"),
    ("entry without sentences", _drop_key(3, "sentences"),
     "images[3] (3.jpg) has no 'sentences' list"),
    ("entry with no sentences", _set_key(3, "sentences", []),
     "images[3] (3.jpg) in {manual}/dataset_flickr8k.json has no "
     "sentences: give it at least one"),
    ("sentence without raw", _set_key(3, "sentences", [{"tokens": ["a"]}]),
     "sentence 0 of images[3] (3.jpg) has no 'raw' text"),
    ("two images, one id", _set_key(4, "imgid", 11),
     "images[4] (4.jpg) and images[1] in {manual}/dataset_flickr8k.json have "
     "the same image id 11"),
    ("missing images", _remove_images("1.jpg", "5.jpg"),
     "2 of the 7 images in dataset_flickr8k.json are not in "
     "{manual}/Flicker8k_Dataset (1.jpg, 5.jpg): put the images from "
     "Flickr8k_Dataset.zip (the University of Illinois' request form) "
     "there."),
    ("truncated image", _truncate_image,
     "Cannot read image {manual}/Flicker8k_Dataset/4.jpg (listed in "
     "dataset_flickr8k.json): replace the file with a readable image or "
     "remove its entry."),
    ("not an image", _not_an_image,
     "Cannot read image {manual}/Flicker8k_Dataset/0.jpg"),
    ("no test images", _drop_split("test"),
     "{manual}/dataset_flickr8k.json has no images in split 'test' "
     "(Karpathy's dataset_flickr8k.json has train, val and test): use "
     "Karpathy's file, or the custom config for your own splits "
     "(docs/your_own_data.md)."),
]


def _nothing_prepared(config):
  builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  assert not builder.is_prepared()
  # Neither the version folder nor TFDS's temporary one is left.
  folder = os.path.join(config.data_dir, *config.dataset.split("/"))
  assert not os.path.exists(folder) or not os.listdir(folder)


@pytest.mark.parametrize("case,break_it,says", _BAD_INPUTS,
                         ids=[c[0] for c in _BAD_INPUTS])
def test_bad_input_is_one_sentence_and_prepares_nothing(tmp_path, case,
                                                        break_it, says):
  del case
  config = _config(tmp_path, "flickr8k")
  _write_set(config.manual_dir, "flickr8k")
  break_it(config.manual_dir,
           os.path.join(config.manual_dir, "dataset_flickr8k.json"))
  with pytest.raises(input_pipeline.DataError) as info:
    input_pipeline.get_builder(config)
  message = str(info.value)
  assert "\n" not in message and message.endswith("."), message
  assert says.format(manual=config.manual_dir) in message, message
  _nothing_prepared(config)


def test_a_missing_manual_dir_names_the_json(tmp_path):
  config = _config(tmp_path, "flickr8k")
  config.manual_dir = str(tmp_path / "nowhere")
  with pytest.raises(input_pipeline.DataError,
                     match=r"^No caption file .*/nowhere/dataset_flickr8k"):
    input_pipeline.get_builder(config)
  # TFDS's default manual dir when config.manual_dir is unset.
  config.manual_dir = ""
  default = os.path.join(config.data_dir, "downloads", "manual")
  with pytest.raises(input_pipeline.DataError,
                     match=f"^No caption file {default}/dataset_flickr8k"):
    input_pipeline.get_builder(config)


def test_custom_messages_name_the_format_and_every_folder(tmp_path):
  config = _config(tmp_path, "custom")
  manual = config.manual_dir
  _write_set(manual, "custom")
  os.remove(os.path.join(manual, "images", "0.jpg"))
  os.remove(os.path.join(manual, "more", "picture.png"))
  with pytest.raises(input_pipeline.DataError) as info:
    input_pipeline.get_builder(config)
  # Missing in two folders: the manual dir and the paths below it.
  assert str(info.value) == (
      f"2 of the 7 images in captions.json are not in {manual} "
      "(images/0.jpg, more/picture.png): put them there, or fix their "
      "'filename' or 'filepath'.")
  os.remove(os.path.join(manual, "captions.json"))
  with pytest.raises(input_pipeline.DataError) as info:
    input_pipeline.get_builder(config)
  assert str(info.value) == (
      f"No caption file {manual}/captions.json: put captions.json (written "
      f"as docs/your_own_data.md shows) in {manual}, or point "
      "--config.manual_dir at the folder that holds it.")
  _nothing_prepared(config)


def test_a_coco_entry_needs_its_filepath(tmp_path):
  config = _config(tmp_path, "coco")
  _write_set(config.manual_dir, "coco")
  path = os.path.join(config.manual_dir, "dataset_coco.json")
  with open(path) as f:
    data = json.load(f)
  del data["images"][0]["filepath"]
  with open(path, "w") as f:
    json.dump(data, f)
  with pytest.raises(input_pipeline.DataError,
                     match=r"^images\[0\] \(COCO_train2014_000000001000.jpg\) "
                     r"in dataset_coco.json has no 'filepath'"):
    input_pipeline.get_builder(config)


def test_a_fixed_set_builds_after_a_failed_build(tmp_path):
  config = _config(tmp_path, "flickr8k")
  _write_set(config.manual_dir, "flickr8k")
  good = os.path.join(config.manual_dir, "Flicker8k_Dataset", "4.jpg")
  os.rename(good, good + ".bak")
  with open(good, "w") as f:
    f.write("broken")
  with pytest.raises(input_pipeline.DataError, match="Cannot read image"):
    input_pipeline.get_builder(config)
  os.replace(good + ".bak", good)
  builder = input_pipeline.get_builder(config)
  assert builder.info.splits["train"].num_examples == _SIZES["train"]


def test_a_split_the_file_lacks_is_named_at_start(tmp_path):
  # The custom config takes any splits; a run that asks for one the file
  # lacks stops before training, not at its final test evaluation.
  config = _config(tmp_path, "custom")
  _write_set(config.manual_dir, "custom", {"train": 2, "val": 1})
  with pytest.raises(input_pipeline.DataError) as info:
    input_pipeline.TfdsSource(config)
  assert str(info.value) == (
      "Split 'test' of config.test_split is not in karpathy_captions/custom "
      "(it has train, val): fix --config.test_split.")


def test_unknown_config_lists_the_datasets(tmp_path):
  config = _config(tmp_path, "flickr9k")
  with pytest.raises(input_pipeline.DataError) as info:
    input_pipeline.get_builder(config)
  message = str(info.value)
  assert message.startswith("Unknown dataset 'karpathy_captions/flickr9k'")
  assert "karpathy_captions/NAME (NAME: flickr8k, flickr30k, coco or " \
      "custom)" in message and "\n" not in message


def test_the_flickr_configs_follow_the_tutorial():
  config = flickr8k.get_config()
  assert config.dataset == "karpathy_captions/flickr8k"
  assert (config.train_split, config.eval_split, config.test_split) == (
      "train", "val", "test")
  assert config.batch_size == 32 and config.learning_rate == 4e-4
  assert config.captions_per_image == 1
  assert config.lr_mults.encoder == 0.0
  # 120 epochs over five captions per image, 32 captions a step.
  assert config.num_train_steps == 120 * (6000 * 5 // 32)
  assert (config.image_size, config.model.grid) == (256, 14)
  assert config.grad_clip_value == 5.0 and config.grad_clip_norm == 0.0
  assert config.best_metric == "bleu4"


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe,folder", [
    ("flickr8k", flickr8k, "Flicker8k_Dataset"),
    ("flickr30k", flickr30k, "flickr30k-images")])
def test_flickr_config_trains_evaluates_and_captions(tmp_path, name, recipe,
                                                     folder):
  """configs/flickr8k.py and flickr30k.py at tiny sizes: train, score with
  the evaluation command (equal to the final line), caption one of the
  set's JPEGs."""
  from visionspeak_jax import train  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.tools import caption  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.tools import evaluate  # pylint: disable=g-import-not-at-top
  small = _config(tmp_path, name)
  config = recipe.get_config()
  # The recipe's data and splits; tiny.py's model, sizes and schedule.
  for field in ("data_dir", "manual_dir", "image_size", "vocab_min_count",
                "batch_size", "eval_batch_size", "warmup_steps",
                "shuffle_buffer_size", "max_decode_length", "learning_rate"):
    config[field] = small[field]
  for field in small.model:
    config.model[field] = small.model[field]
  config.model.pretrained_path = ""
  config.model.require_pretrained = False
  config.dtype = "float32"
  config.cache_train_images = False
  config.num_train_steps = 3
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.metrics_protocol = "regex-tokens"
  _write_set(config.manual_dir, name)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  assert "cider" in results and "content_f1" not in results
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  final = records[-1]
  assert final["split"] == "test" and final["step"] == 3
  assert final["num_images"] == _SIZES["test"]
  assert any(r["split"] == "val" for r in records)

  report = evaluate.evaluate_run(workdir)
  assert {k: report["metrics"][k] for k in results} == results
  with open(report["captions"]) as f:
    assert len(json.load(f)) == _SIZES["test"]

  image = os.path.join(config.manual_dir, folder, "0.jpg")
  out = io.StringIO()
  assert caption.run([image], workdir=workdir, beam_size=3, stdout=out,
                     stderr=io.StringIO()) == 0
  assert out.getvalue().startswith(f"{image}: ")