"""Captions in Andrej Karpathy's split files: Flickr8k, Flickr30k, COCO, yours.

`karpathy_captions` reads the JSON files of Karpathy's caption_datasets.zip
("Deep visual-semantic alignments", neuraltalk2) and the images they name,
from TFDS's manual directory: nothing is downloaded. Its features and split
names are those of `coco_captions/2014` without the objects (`image`,
`image/filename`, `image/id`, `captions` with `id` and `text`; splits
`train`, `val`, `test` and, where the file has it, `restval`), so every COCO
config runs on it unchanged but for the dataset name.

| config | JSON | images |
| --- | --- | --- |
| flickr8k | dataset_flickr8k.json | Flicker8k_Dataset/<filename> |
| flickr30k | dataset_flickr30k.json | flickr30k-images/<filename> |
| coco | dataset_coco.json | <filepath>/<filename> (train2014, val2014) |
| custom | captions.json | images/<filename>, or <filepath>/<filename> |

The JSON: `{"images": [{"filename": ..., "split": "train" | "val" | "test" |
"restval", "sentences": [{"raw": ...}, ...], "filepath": ... (optional),
"cocoid" or "imgid": ... (optional)}, ...]}` (docs/your_own_data.md). An
image's `image/id` is its `cocoid`, else its `imgid`, else its index in the
file; a caption's `id` is its `sentid`, else its index among all captions.

Training prepares it on first use (`input_pipeline.get_builder`, with
`config.manual_dir`). By hand:

  import tensorflow_datasets as tfds
  # Registers `karpathy_captions`:
  import visionspeak_jax.data.datasets.karpathy

  builder = tfds.builder("karpathy_captions/flickr8k", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))

Every problem with the files is a `CaptionFilesError` in one sentence, and
the JSON and the image files are all checked before one example is written;
an image that cannot be read stops the build as well (TFDS then removes
what it wrote), so a prepared set never lacks an image of its file. JPEG
files are stored as they are; other formats, and JPEGs in modes other than
RGB and grey, are stored re-encoded as RGB JPEGs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
from typing import Any
import warnings

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from visionspeak_jax import errors
from visionspeak_jax.data import images as images_lib

# coco_captions/2014's split names, in the order its builder makes them.
SPLITS = ("train", "val", "test", "restval")
# Quality of the JPEGs that non-JPEG (or CMYK, ...) images are stored as.
_REENCODE_QUALITY = 95
# Images read ahead of TFDS's writer: bounds the memory they hold.
_READ_CHUNK = 64
# Missing image files named in the error message.
_MISSING_SHOWN = 3
_DOCS = "docs/your_own_data.md"


class CaptionFilesError(errors.UserError):
  """The JSON or the images of a karpathy_captions config cannot be used."""


@dataclasses.dataclass
class KarpathyConfig(tfds.core.BuilderConfig):
  """Where a karpathy_captions config finds its files, and what it needs.

  Attributes:
    json_name: the caption file, in the manual directory.
    image_folder: the folder of the images, in the manual directory; None:
      each entry's `filepath` names it (COCO: train2014, val2014).
    use_filepath: an entry's `filepath`, when given, names its folder.
    required_splits: splits the source's own file always has; a file that
      lacks one is not that source's file.
    json_origin: where the JSON comes from, after its name in messages.
    images_fix: what to do about missing images, in messages.
  """

  json_name: str = "captions.json"
  image_folder: str | None = "images"
  use_filepath: bool = True
  required_splits: tuple[str, ...] = ()
  json_origin: str = ""
  images_fix: str = ""


_KARPATHY_ZIP = "Karpathy's caption_datasets.zip"
_FROM_KARPATHY_ZIP = f"from {_KARPATHY_ZIP}"


class KarpathyCaptions(tfds.core.GeneratorBasedBuilder):
  """Karpathy-split caption files and their images, from the manual dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": ("Initial release: Flickr8k, Flickr30k, COCO (Karpathy "
                "splits) and custom captions with coco_captions' features."),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Put the config's caption file and images in the manual directory
  (--config.manual_dir, default <data_dir>/downloads/manual):
    flickr8k:  dataset_flickr8k.json and Flicker8k_Dataset/
    flickr30k: dataset_flickr30k.json and flickr30k-images/
    coco:      dataset_coco.json, train2014/ and val2014/
    custom:    captions.json and images/
  The JSON files are in {_KARPATHY_ZIP}; see {_DOCS}.
  """
  BUILDER_CONFIGS = [
      KarpathyConfig(
          name="flickr8k",
          description="Flickr8k, Karpathy splits: 6000 / 1000 / 1000 images.",
          json_name="dataset_flickr8k.json",
          image_folder="Flicker8k_Dataset",
          use_filepath=False,
          required_splits=("train", "val", "test"),
          json_origin=_FROM_KARPATHY_ZIP,
          images_fix=("put the images from Flickr8k_Dataset.zip (the "
                      "University of Illinois' request form) there")),
      KarpathyConfig(
          name="flickr30k",
          description=("Flickr30k, Karpathy splits: 29000 / 1014 / 1000 "
                       "images."),
          json_name="dataset_flickr30k.json",
          image_folder="flickr30k-images",
          use_filepath=False,
          required_splits=("train", "val", "test"),
          json_origin=_FROM_KARPATHY_ZIP,
          images_fix=("put the images of flickr30k-images (its authors' "
                      "request form) there")),
      KarpathyConfig(
          name="coco",
          description=("COCO 2014, Karpathy splits: 82783 train, 30504 "
                       "restval, 5000 val and 5000 test images."),
          json_name="dataset_coco.json",
          image_folder=None,
          required_splits=SPLITS,
          json_origin=_FROM_KARPATHY_ZIP,
          images_fix=("put COCO's train2014 and val2014 folders "
                      "(cocodataset.org) there")),
      KarpathyConfig(
          name="custom",
          description="Your own captions.json and images/ (see "
                      f"{_DOCS}).",
          json_name="captions.json",
          image_folder="images",
          json_origin=f"written as {_DOCS} shows",
          images_fix=("put them there, or fix their 'filename' or "
                      "'filepath'")),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "flickr8k"

  def _info(self) -> tfds.core.DatasetInfo:
    # coco_captions/2014's features (see coco_rehearsal.py), key for key and
    # in its order, without the objects these files do not have.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Images and captions of Andrej Karpathy's caption split files "
            "(Flickr8k, Flickr30k, COCO, or your own), with the features "
            "and split names of coco_captions/2014 without objects."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({
                "text": np.str_,
                "id": np.int64,
            }),
        }),
        homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    manual_dir = _manual_dir(dl_manager)
    json_path = os.path.join(manual_dir, config.json_name)
    entries = read_caption_file(json_path, config)
    paths = [image_path(manual_dir, config, e) for e in entries]
    check_images_exist(paths, manual_dir, json_path, config)
    by_split = {split: [] for split in SPLITS}
    for entry, path in zip(entries, paths):
      by_split[entry["split"]].append((entry, path))
    logging.info("%s: %s.", json_path, ", ".join(
        f"{len(items)} {split}" for split, items in by_split.items() if items))
    for split in config.required_splits:
      if not by_split[split]:
        raise CaptionFilesError(
            f"{json_path} has no images in split {split!r} (Karpathy's "
            f"{config.json_name} has {_and(config.required_splits)}): use "
            "Karpathy's file, or the custom config for your own splits "
            f"({_DOCS}).")
    # Only splits with images: an empty split would read as a dataset that
    # has it, and a run would evaluate on nothing.
    return {split: self._generate_examples(items, json_path)
            for split, items in by_split.items() if items}

  def _generate_examples(self, items, json_path: str):
    workers = max(1, min(4, os.cpu_count() or 1))
    # Reading and checking images (PIL decodes releasing the GIL) overlaps
    # TFDS's serialisation; examples are yielded in file order.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for start in range(0, len(items), _READ_CHUNK):
        chunk = items[start:start + _READ_CHUNK]
        images = pool.map(lambda item: read_image(item[1], json_path), chunk)
        for (entry, _), image in zip(chunk, images):
          yield entry["index"], {
              "image": image,
              "image/filename": entry["filename"],
              "image/id": entry["image_id"],
              "captions": entry["captions"],
          }


def _and(names) -> str:
  names = list(names)
  return names[0] if len(names) == 1 else (
      ", ".join(names[:-1]) + " and " + names[-1])


def _manual_dir(dl_manager) -> str:
  """The manual directory; a missing or empty one is not TFDS's page of
  instructions but the missing-file sentence of `read_caption_file`."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError:
    # TFDS refuses a missing or empty folder with a multi-line message; the
    # path it looked at is what the user needs.
    return os.fspath(dl_manager._manual_dir)  # pylint: disable=protected-access


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def read_caption_file(json_path: str, config: KarpathyConfig
                      ) -> list[dict[str, Any]]:
  """Reads and checks a Karpathy-format caption file.

  Args:
    json_path: the JSON file.
    config: the builder config (names the file's source in messages).

  Returns:
    One dict per image, in file order: `index`, `filename`, `filepath`
    (or None), `split`, `image_id`, `captions` (a list of {id, text}).

  Raises:
    CaptionFilesError: the file is missing, not JSON, not in Karpathy's
      format, has an image without captions, has no images, or gives two
      images one id.
  """
  if not os.path.isfile(json_path):
    raise CaptionFilesError(
        f"No caption file {json_path}: put {config.json_name} "
        f"({config.json_origin}) in {os.path.dirname(json_path)}, or point "
        "--config.manual_dir at the folder that holds it.")
  try:
    with open(json_path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise CaptionFilesError(
        f"Cannot read {json_path} ({e.strerror or e}): make it readable."
    ) from e
  except ValueError as e:  # UnicodeDecodeError and JSONDecodeError too.
    raise CaptionFilesError(
        f"{json_path} is not a JSON file ({e}): replace it with "
        f"{config.json_name} {config.json_origin}.") from e

  def not_karpathy(what: str) -> CaptionFilesError:
    return CaptionFilesError(
        f"{json_path} is not in Karpathy's format: {what}; see {_DOCS}.")

  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise not_karpathy("it has no 'images' list")
  if not data["images"]:
    raise CaptionFilesError(
        f"{json_path} lists no images: add entries to its 'images' list "
        f"({_DOCS}).")
  entries, ids, sentence_count = [], {}, 0
  for index, item in enumerate(data["images"]):
    where = f"images[{index}]"
    if not isinstance(item, dict):
      raise not_karpathy(f"{where} is not an object")
    filename = item.get("filename")
    if not isinstance(filename, str) or not filename:
      raise not_karpathy(f"{where} has no 'filename'")
    where = f"images[{index}] ({filename})"
    split = item.get("split")
    if split is None:
      raise not_karpathy(f"{where} has no 'split'")
    if split not in SPLITS:
      raise not_karpathy(f"{where} has split {split!r}, not one of "
                         f"{', '.join(SPLITS)}")
    filepath = item.get("filepath")
    if filepath is not None and not isinstance(filepath, str):
      raise not_karpathy(f"{where} has a 'filepath' that is not a string")
    sentences = item.get("sentences")
    if not isinstance(sentences, list):
      raise not_karpathy(f"{where} has no 'sentences' list")
    if not sentences:
      raise CaptionFilesError(
          f"{where} in {json_path} has no sentences: give it at least one "
          "{\"raw\": \"...\"} or remove it.")
    captions = []
    for k, sentence in enumerate(sentences):
      if not isinstance(sentence, dict) or not isinstance(
          sentence.get("raw"), str):
        raise not_karpathy(f"sentence {k} of {where} has no 'raw' text")
      sentid = sentence.get("sentid")
      captions.append({
          "id": sentid if _is_int(sentid) else sentence_count,
          "text": sentence["raw"]})
      sentence_count += 1
    image_id = index
    for key in ("cocoid", "imgid"):
      if key in item:
        if not _is_int(item[key]) or item[key] < 0:
          raise not_karpathy(f"{where} has a '{key}' that is not a whole "
                             "number >= 0")
        image_id = item[key]
        break
    if image_id in ids:
      raise CaptionFilesError(
          f"{where} and images[{ids[image_id]}] in {json_path} have the same "
          f"image id {image_id}: give every image its own 'cocoid'/'imgid' "
          "or none.")
    ids[image_id] = index
    entries.append({"index": index, "filename": filename,
                    "filepath": filepath, "split": split,
                    "image_id": image_id, "captions": captions})
  return entries


def image_path(manual_dir: str, config: KarpathyConfig,
               entry: dict[str, Any]) -> str:
  """Where the image of `entry` is: the config's folder, or its `filepath`.

  Raises:
    CaptionFilesError: a COCO entry without `filepath`.
  """
  folder = config.image_folder
  if config.use_filepath and entry["filepath"] is not None:
    folder = entry["filepath"]
  if folder is None:
    raise CaptionFilesError(
        f"images[{entry['index']}] ({entry['filename']}) in "
        f"{config.json_name} has no 'filepath' (train2014 or val2014): use "
        f"Karpathy's {config.json_name}, which gives it for every image.")
  return os.path.join(manual_dir, folder, entry["filename"])


def check_images_exist(paths: list[str], manual_dir: str, json_path: str,
                       config: KarpathyConfig) -> None:
  """Refuses a file list with missing images, before anything is read.

  Raises:
    CaptionFilesError: how many are missing, the first few, and where they
      were looked for.
  """
  missing = [p for p in paths if not os.path.isfile(p)]
  if not missing:
    return
  folders = sorted({os.path.dirname(p) for p in missing})
  if len(folders) == 1:
    where, names = folders[0], [os.path.basename(p) for p in missing]
  else:
    where, names = manual_dir, [os.path.relpath(p, manual_dir)
                                for p in missing]
  shown = ", ".join(names[:_MISSING_SHOWN])
  if len(names) > _MISSING_SHOWN:
    shown += ", ..."
  raise CaptionFilesError(
      f"{len(missing)} of the {len(paths)} images in "
      f"{os.path.basename(json_path)} are not in {where} ({shown}): "
      f"{config.images_fix}.")


def read_image(path: str, json_path: str) -> bytes:
  """An image file's bytes as stored: JPEG, checked to decode.

  RGB and grey JPEGs are kept byte for byte (TensorFlow decodes them in
  training, as it does coco_captions'); anything else PIL reads is stored
  as an RGB JPEG.

  Raises:
    CaptionFilesError: the file cannot be read or decoded (names the file).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    with warnings.catch_warnings():
      # Large photos are fine; PIL still refuses those past twice its limit.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.mode in ("L", "RGB"):
          # Decoded at 1/8 scale: every byte is still parsed, so a truncated
          # or corrupt file fails here, for a fraction of a full decode.
          image.draft(image.mode, (max(1, image.width // 8),
                                   max(1, image.height // 8)))
          image.load()
          return data
        image.load()
        buffer = io.BytesIO()
        # The caption CLI's conversion: alpha on white, 16-bit scaled.
        images_lib.to_rgb(image).save(
            buffer, format="jpeg", quality=_REENCODE_QUALITY)
        return buffer.getvalue()
  except Exception as e:  # pylint: disable=broad-except
    # PIL reports damaged files as OSError, SyntaxError, ValueError,
    # DecompressionBombError... by format; to the user it is one problem.
    raise CaptionFilesError(
        f"Cannot read image {path} (listed in {os.path.basename(json_path)}): "
        "replace the file with a readable image or remove its entry.") from e

