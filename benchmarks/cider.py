r"""Speed of `cider.CiderD` against pycocoevalcap's Cider on an SCST batch.

A batch is what one self-critical step scores: `--images` images with
`--samples` sampled captions each, every sample against its image's
`--refs` references. Two kinds of captions:

- shapes: the shapes set's captions (validation images), a small vocabulary
  and much overlap; samples are the image's own captions, another image's
  or a perturbed own one. Frequencies from `--shapes_train` training images.
- coco-like: `--words`-word captions drawn from a Zipf law over
  `--vocab_size` words; samples are perturbed references or fresh random
  captions. Frequencies from `--coco_train` random images.

Ours scores vocabulary ids (as the SCST step does) three ways: from scratch
(`score(samples, references, image_index)`), with references prepared once
(`score(samples, prepare(references), image_index)`, prepare not timed) and
on a padded id array with lengths. pycocoevalcap takes one caption per
image, so it gets the batch as images x samples "images" (each reference
list repeated) and builds its document frequencies from them, as a
per-batch call to it would. Each time is the median of `--repeats` calls.

  python benchmarks/cider.py
  python benchmarks/cider.py --coco_train=118287   # COCO's train size.
"""

import os
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import numpy as np
from pycocoevalcap.cider.cider import Cider

# Run from a checkout: the package sits one level up.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from visionspeak_jax.evaluation import cider

_IMAGES = flags.DEFINE_integer("images", 64, "Images per batch.")
_SAMPLES = flags.DEFINE_integer("samples", 5, "Samples (K) per image.")
_REFS = flags.DEFINE_integer("refs", 5, "References per image.")
_WORDS = flags.DEFINE_integer("words", 10, "Words of a coco-like caption.")
_VOCAB = flags.DEFINE_integer("vocab_size", 10000, "Coco-like vocabulary.")
_COCO_TRAIN = flags.DEFINE_integer(
    "coco_train", 20000, "Coco-like training images for the frequencies.")
_SHAPES_TRAIN = flags.DEFINE_integer(
    "shapes_train", 1000, "Shapes training images for the frequencies.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per number.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the captions.")


def cpu_model() -> str:
  """`lscpu`'s model name (else /proc/cpuinfo's), and the core count."""
  name = ""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=False).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "")
  except OSError:
    pass
  if not name and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name")), "")
  return f"{name or 'unknown CPU'}, {os.cpu_count()} cores"


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  fn()  # Warm-up: first-call allocations and caches.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _perturb(rng: np.random.Generator, words: list[Any],
             pool: list[Any]) -> list[Any]:
  """Drops, replaces and inserts a word or two."""
  words = list(words)
  for _ in range(rng.integers(1, 3)):
    op = rng.integers(3)
    if op == 0 and len(words) > 1:
      del words[rng.integers(len(words))]
    elif op == 1:
      words[rng.integers(len(words))] = pool[rng.integers(len(pool))]
    else:
      words.insert(rng.integers(len(words) + 1), pool[rng.integers(len(pool))])
  return words


def shapes_batch(rng: np.random.Generator):
  """(training references, batch references, samples) of shapes words."""
  from visionspeak_jax.data.datasets import shapes

  def captions(split, n):
    return [[c.split() for c in shapes.generate_example(
        shapes.example_rng(split, i), shapes.example_id(split, i))["captions"]]
            for i in range(n)]

  train = captions("train", _SHAPES_TRAIN.value)
  refs = [r[:_REFS.value] for r in captions("validation", _IMAGES.value)]
  pool = sorted({w for image in train for c in image for w in c})
  samples = []
  for i in range(_IMAGES.value):
    for _ in range(_SAMPLES.value):
      kind = rng.integers(3)
      image = i if kind < 2 else rng.integers(_IMAGES.value)
      caption = refs[image][rng.integers(len(refs[image]))]
      samples.append(_perturb(rng, caption, pool) if kind == 1 else
                     list(caption))
  return train, refs, samples


def coco_like_batch(rng: np.random.Generator):
  """(training references, batch references, samples) of word strings."""
  vocab = [f"w{i}" for i in range(_VOCAB.value)]
  # Zipf-like word frequencies, as in real captions ("a", "of", "the" ...).
  p = 1.0 / np.arange(1, _VOCAB.value + 1)
  p /= p.sum()

  def random_captions(n):
    ids = rng.choice(_VOCAB.value, size=(n, _WORDS.value), p=p)
    return [[vocab[i] for i in row] for row in ids]

  flat = random_captions(_COCO_TRAIN.value * _REFS.value)
  train = [flat[i * _REFS.value:(i + 1) * _REFS.value]
           for i in range(_COCO_TRAIN.value)]
  flat = random_captions(_IMAGES.value * _REFS.value)
  refs = [flat[i * _REFS.value:(i + 1) * _REFS.value]
          for i in range(_IMAGES.value)]
  fresh = random_captions(_IMAGES.value * _SAMPLES.value)
  samples = [
      _perturb(rng, refs[i][rng.integers(_REFS.value)], vocab)
      if rng.random() < 0.5 else fresh[i * _SAMPLES.value + k]
      for i in range(_IMAGES.value) for k in range(_SAMPLES.value)
  ]
  return train, refs, samples


def run(name: str, train, refs, samples) -> None:
  """Times one batch every way and prints the lines."""
  k = _SAMPLES.value
  n = len(samples)
  image_index = np.repeat(np.arange(len(refs)), k)
  # Word ids as the SCST step sees them (0..3 are PAD, BOS, EOS, UNK).
  words = sorted({w for image in train + refs for c in image for w in c}
                 | {w for c in samples for w in c})
  ids = {w: i + 4 for i, w in enumerate(words)}

  def to_ids(captions):
    return [[ids[w] for w in c] for c in captions]

  train_ids = [to_ids(image) for image in train]
  ref_ids = [to_ids(image) for image in refs]
  sample_ids = to_ids(samples)
  width = max(map(len, sample_ids)) + 1
  tokens = np.zeros((n, width), np.int32)
  for i, c in enumerate(sample_ids):
    tokens[i, :len(c)] = c
  lengths = np.array([len(c) for c in sample_ids])

  start = time.perf_counter()
  df = cider.DocumentFrequencies.build(train_ids)
  build_s = time.perf_counter() - start
  scorer = cider.CiderD(df)
  prepared = scorer.prepare(ref_ids)

  # Sanity: with coco's own frequencies (those of the scored set), the
  # same numbers as pycocoevalcap.
  gts = {i: [" ".join(r) for r in refs[image_index[i]]] for i in range(n)}
  res = {i: [" ".join(c)] for i, c in enumerate(samples)}
  coco_mean, coco_scores = Cider().compute_score(gts, res)
  same_df = cider.DocumentFrequencies.build(
      [ref_ids[i] for i in image_index])
  ours = cider.CiderD(same_df).score(sample_ids, ref_ids, image_index)
  diff = float(np.abs(ours - np.asarray(coco_scores)).max())

  # The same frequencies keyed by words: the evaluation-side path.
  word_scorer = cider.CiderD(cider.DocumentFrequencies.build(train))
  timings = {
      "pycocoevalcap Cider": median_seconds(
          lambda: Cider().compute_score(gts, res), _REPEATS.value),
      "ours, from scratch": median_seconds(
          lambda: scorer.score(sample_ids, ref_ids, image_index),
          _REPEATS.value),
      "ours, prepare only": median_seconds(
          lambda: scorer.prepare(ref_ids), _REPEATS.value),
      "ours, prepared refs": median_seconds(
          lambda: scorer.score(sample_ids, prepared, image_index),
          _REPEATS.value),
      "ours, id array + lengths": median_seconds(
          lambda: scorer.score(tokens, prepared, image_index,
                               lengths=lengths), _REPEATS.value),
      "ours, words from scratch": median_seconds(
          lambda: word_scorer.score(samples, refs, image_index),
          _REPEATS.value),
  }

  mean_words = np.mean([len(c) for c in samples])
  print(f"\n{name}: {len(refs)} images x {k} samples = {n} captions "
        f"(mean {mean_words:.1f} words) against {_REFS.value} references; "
        f"frequencies of {df.num_images} training images, {len(df)} n-grams "
        f"(build {build_s:.2f} s)")
  print(f"  check: max |ours - pycocoevalcap| = {diff:.1e} "
        f"(mean {coco_mean:.4f}) with the batch's own frequencies")
  base = timings["pycocoevalcap Cider"]
  print(f"  {'':28s} {'ms/batch':>10s} {'captions/s':>12s} {'speed-up':>9s}")
  for label, seconds in timings.items():
    print(f"  {label:28s} {seconds * 1e3:10.2f} {n / seconds:12.0f} "
          f"{base / seconds:8.1f}x")
  scratch_ms = timings["ours, from scratch"] * 1e3
  # A training step of the captioner on this kind of CPU takes 100-300 ms
  # (benchmarks/README.md); the rewards come on top of it.
  print(f"  one batch from scratch: {scratch_ms:.1f} ms, "
        f"{scratch_ms / 300 * 100:.1f}-{scratch_ms / 100 * 100:.1f} % of a "
        f"100-300 ms training step (pycocoevalcap: "
        f"{base * 1e3 / 300 * 100:.0f}-{base * 1e3 / 100 * 100:.0f} %)")


def main(argv):
  del argv
  print(f"CPU: {cpu_model()}; numpy {np.__version__}; "
        f"median of {_REPEATS.value} calls")
  rng = np.random.default_rng(_SEED.value)
  run("shapes", *shapes_batch(rng))
  run("coco-like", *coco_like_batch(rng))


if __name__ == "__main__":
  app.run(main)
