"""Captions 64 shapes test images with the CLI: quality, figures and speed.

  python benchmarks/caption_shapes.py WORKDIR OUT_DIR

WORKDIR is a finished default run (configs/shapes.py). Writes the 64 test
images as PNG files under OUT_DIR/images, runs `visionspeak_jax.tools.caption`
on them greedily and with beam 5, with float32 and with bfloat16 decoding
(`--decode_dtype`; figures of the float32 beam-5 run go to OUT_DIR/figures),
and prints the content F1 of each and how many bfloat16 captions equal the
float32 ones. Then it times `caption.caption_arrays` at batch 64.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# Run from a checkout: the package sits one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from visionspeak_jax.data import images as images_lib
from visionspeak_jax.data.datasets import shapes
from visionspeak_jax.evaluation import metrics
from visionspeak_jax.tools import caption

NUM_IMAGES = 64
DTYPES = ("float32", "bfloat16")


def write_images(out: str) -> dict[str, list[tuple[str, str]]]:
  """Test-split PNGs under OUT/images; returns {path: [(colour, shape)]}."""
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  builder = tfds.builder("shapes_captions/default")
  names = builder.info.features["objects"]
  colors, kinds = names["color"].names, names["shape"].names
  objects = {}
  dataset = builder.as_dataset(split="test").take(NUM_IMAGES)
  for i, ex in enumerate(tfds.as_numpy(dataset)):
    path = os.path.join(out, "images", f"test_{i:02d}.png")
    Image.fromarray(ex["image"]).save(path)
    objects[path] = [(colors[c], kinds[s]) for c, s in
                     zip(ex["objects"]["color"], ex["objects"]["shape"])]
  return objects


def run_cli(workdir: str, paths: list[str], beam: int, dtype: str,
            figures: str | None) -> dict[str, str]:
  """{path: caption} from `python -m visionspeak_jax.tools.caption --json`."""
  command = [sys.executable, "-m", "visionspeak_jax.tools.caption",
             f"--workdir={workdir}", f"--beam_size={beam}",
             f"--batch_size={NUM_IMAGES}", f"--decode_dtype={dtype}", "--json"]
  if figures:
    command.append(f"--output={figures}")
  proc = subprocess.run(command + paths, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise SystemExit(proc.stderr[-2000:])
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  return {line["image"]: line["caption"] for line in lines}


def main():
  workdir, out = sys.argv[1], sys.argv[2]
  objects = write_images(out)
  paths = sorted(objects)
  truth = [objects[p] for p in paths]
  for beam in (1, 5):
    captions = {}
    for dtype in DTYPES:
      start = time.time()
      figures = (os.path.join(out, "figures")
                 if beam == 5 and dtype == "float32" else None)
      captions[dtype] = run_cli(workdir, paths, beam, dtype, figures)
      f1 = metrics.content_f1([captions[dtype][p] for p in paths], truth)
      print(f"beam {beam} {dtype}: {len(captions[dtype])} captions, content "
            f"F1 {f1['content_f1']:.4f}, CLI wall {time.time() - start:.1f} s")
    same = sum(captions["float32"][p] == captions["bfloat16"][p]
               for p in paths)
    print(f"beam {beam}: bfloat16 caption equals float32 for {same}/"
          f"{len(paths)} images; e.g. {os.path.basename(paths[0])} -> "
          f"{captions['float32'][paths[0]]!r}")
  print("figures written:", len(os.listdir(os.path.join(out, "figures"))))

  # images/s at batch 64, in the library, after a warm-up (encoder included).
  captioner = caption.load_captioner(workdir)
  images = np.stack([images_lib.load_image(p, captioner.image_size)
                     for p in paths])
  for dtype in DTYPES:
    for beam in (1, 5):
      def run(beam=beam, dtype=dtype):
        return caption.caption_arrays(captioner, images, beam_size=beam,
                                      batch_size=NUM_IMAGES,
                                      decode_dtype=dtype)
      run()
      repeats = 5
      start = time.time()
      for _ in range(repeats):
        run()
      seconds = (time.time() - start) / repeats
      print(f"beam {beam} {dtype} batch {NUM_IMAGES}: "
            f"{NUM_IMAGES / seconds:.1f} images/s ({seconds * 1e3:.0f} ms "
            "per batch, encoder included)")


if __name__ == "__main__":
  main()
