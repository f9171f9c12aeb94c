"""Caption metrics: the COCO scores, and content and grounding for shapes.

`caption_metrics` wraps pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr)
under one of two protocols, and every score set it returns names its
protocol:

- "coco": the COCO caption evaluation as pycocoevalcap's `COCOEvalCap`
  runs it: the PTB tokenizer and METEOR 1.5, both on Java. Its scores
  equal `COCOEvalCap`'s to the last digit and are the ones papers publish.
- "regex-tokens": without Java. Captions are tokenized as the vocabulary
  does (`vocabulary.tokenize`) and METEOR is left out. Close to, but not,
  the published protocol: never compare these with published numbers.

`parse_objects`, `content_f1` and `attention_grounding` rely on the caption
grammar of the shapes set (see `visionspeak_jax.data.datasets.shapes`): every
shape word is preceded by its colour word, and no other word is a colour or a shape.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import subprocess
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging
import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

# The word lists, not the `shapes` builder, which would import TensorFlow.
from visionspeak_jax.data.datasets import shapes_words
from visionspeak_jax.text import vocabulary

_COLOR_WORDS = frozenset(shapes_words.COLORS)
_SHAPE_WORDS = frozenset(shapes_words.SHAPES)
_PTB_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS)


def _ptb_tokenize(captions: list[str]) -> list[str]:
  """Tokenizes like pycocoevalcap's PTBTokenizer, one output per caption.

  Runs the same jar with the same options and drops the same punctuation as
  `PTBTokenizer.tokenize`, but feeds stdin instead of a temporary file in
  site-packages (which may be read-only) and keeps the JVM's progress line
  off the training log.

  Args:
    captions: raw captions.

  Returns:
    The tokenized captions, lowercase, in the same order.
  """
  jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                     ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
  # One caption per line: -preserveLines keeps the line structure, so any
  # line break inside a caption would shift every later caption.
  text = "".join(" ".join(c.split()) + "\n" for c in captions)
  proc = subprocess.run(
      ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
       "-preserveLines", "-lowerCase", "-encoding", "utf-8"],
      input=text.encode("utf-8"), capture_output=True, check=False)
  lines = proc.stdout.decode("utf-8").split("\n")
  if proc.returncode != 0 or len(lines) < len(captions):
    raise RuntimeError(
        "The Java PTB tokenizer failed "
        f"({proc.stderr.decode('utf-8', 'replace').strip()[-300:]}); "
        "score with protocol='regex-tokens' to tokenize without Java.")
  return [
      " ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION)
      for line in lines[:len(captions)]
  ]


def _close_meteor(scorer: Meteor) -> None:
  """Stops the scorer's JVM now rather than whenever it is collected."""
  proc = scorer.meteor_p
  # A failed compute_score leaves the lock held, and Meteor.__del__ takes the
  # lock: release it, or garbage collection would hang the program.
  if scorer.lock.locked():
    scorer.lock.release()
  for stream in (proc.stdin, proc.stdout, proc.stderr):
    with contextlib.suppress(OSError):
      stream.close()
  if proc.poll() is None:
    proc.kill()
  proc.wait()


# The METEOR scorer that `shared_meteor` keeps running, or None.
_shared: list[Meteor | None] = []

# The metric protocols (see the module docstring), and "auto": "coco" where
# `java` is on the PATH, else "regex-tokens".
COCO = "coco"
REGEX_TOKENS = "regex-tokens"
AUTO = "auto"
PROTOCOLS = (AUTO, COCO, REGEX_TOKENS)


def resolve_protocol(protocol: str) -> str:
  """The protocol `caption_metrics(protocol=protocol)` scores with.

  Args:
    protocol: one of `PROTOCOLS`.

  Returns:
    "coco" or "regex-tokens"; "auto" is "coco" when `java` is on the PATH.

  Raises:
    ValueError: an unknown protocol.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown metric protocol {protocol!r}; pass one of "
                     f"{', '.join(PROTOCOLS)}.")
  if protocol == AUTO:
    return COCO if shutil.which("java") is not None else REGEX_TOKENS
  return protocol


def metric_names(*, protocol: str, has_objects: bool) -> tuple[str, ...]:
  """The metrics an evaluation reports.

  Args:
    protocol: `caption_metrics`' argument (METEOR is scored under "coco").
    has_objects: the examples carry the shapes set's objects (content F1
      and grounding need them).
  """
  names = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider",
           "function_word_endings")
  if resolve_protocol(protocol) == COCO:
    names += ("meteor",)
  if has_objects:
    names += ("content_precision", "content_recall", "content_f1",
              "grounding", "grounding_chance")
  return names


@contextlib.contextmanager
def shared_meteor(protocol: str = AUTO) -> Iterator[None]:
  """Inside it, every METEOR score comes from one JVM, started at entry.

  METEOR's JVM takes longer to load its tables than to score a split's
  captions (docs/performance.md has the figures). A training run scores at
  every evaluation: started when the run starts, the JVM loads while the
  run trains, and the evaluations only score. On leaving, the JVM is shut down, so nothing is
  left behind; outside, each `caption_metrics` call starts and stops its
  own. Where `protocol` (`caption_metrics`' argument) resolves to
  "regex-tokens", it starts nothing. Nested uses share the outer one.
  """
  if _shared or resolve_protocol(protocol) != COCO:
    yield
    return
  _shared.append(Meteor())
  try:
    yield
  finally:
    scorer = _shared.pop()
    if scorer is not None:
      _close_meteor(scorer)


def _meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
  """METEOR 1.5 through pycocoevalcap, the JVM shut down when done.

  Done: after this call, or at the end of the `shared_meteor` block.
  """
  shared = bool(_shared)
  scorer = (_shared[0] or Meteor()) if shared else Meteor()
  if shared:
    _shared[0] = scorer
  failed = True
  try:
    score, _ = scorer.compute_score(gts, res)
    failed = False
  except (ValueError, OSError) as e:
    # An empty reply (the JVM died) fails to parse as a float.
    raise RuntimeError("The METEOR scorer (Java) failed; score with "
                       "protocol='regex-tokens' to skip it.") from e
  finally:
    if failed or not shared:
      _close_meteor(scorer)
      if shared:
        _shared[0] = None  # The next score starts a new JVM.
  return float(score)


def caption_metrics(
    references: Mapping[Any, Sequence[str]],
    predictions: Mapping[Any, str],
    *,
    protocol: str = AUTO,
) -> dict[str, float | str]:
  """COCO caption scores of predicted captions against references.

  Scores are corpus-level over the images in `predictions`; references of
  other images are ignored (CIDEr's document frequencies come from the scored
  images only, as in the COCO evaluation server).

  Args:
    references: image id -> reference captions (raw text).
    predictions: image id -> one predicted caption (raw text); every id needs
      references.
    protocol: "coco" (the PTB tokenizer and METEOR, on Java, as
      pycocoevalcap's `COCOEvalCap`), "regex-tokens" (no Java: captions
      tokenized as the vocabulary does, lowercase with punctuation dropped,
      and no METEOR), or "auto" ("coco" when `java` is on the PATH).

  Returns:
    "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider" and, under
    "coco", "meteor", as floats (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr is
    pycocoevalcap's, scaled by 10); and "protocol", the protocol scored
    with ("coco" or "regex-tokens").

  Raises:
    ValueError: no predictions, a prediction without references, an
      unknown protocol, or "coco" without Java.
  """
  if not predictions:
    raise ValueError("caption_metrics needs at least one prediction.")
  missing = [k for k in predictions if not references.get(k)]
  if missing:
    raise ValueError(
        f"{len(missing)} predicted image ids have no reference captions "
        f"(e.g. {missing[0]!r}); pass references for every prediction.")
  if protocol == COCO and shutil.which("java") is None:
    raise ValueError("The coco metric protocol needs Java, and no `java` "
                     "executable is on the PATH; install a Java runtime or "
                     "score with protocol='regex-tokens'.")
  protocol = resolve_protocol(protocol)
  if protocol == REGEX_TOKENS:
    logging.log_first_n(
        logging.WARNING,
        "Scoring with the regex-tokens protocol, not COCO's: no PTB "
        "tokenizer and no METEOR (they need Java); captions are tokenized "
        "as the vocabulary does (lowercase, punctuation dropped). These "
        "scores are marked protocol=regex-tokens: do not compare them with "
        "published numbers.", 1)

  ids = list(predictions)
  ref_lists = [list(references[k]) for k in ids]
  flat = [predictions[k] for k in ids] + [r for refs in ref_lists for r in refs]
  if protocol == COCO:
    tokens = _ptb_tokenize(flat)
  else:
    tokens = [" ".join(vocabulary.tokenize(c)) for c in flat]
  res = {k: [tokens[i]] for i, k in enumerate(ids)}
  gts = {}
  offset = len(ids)
  for k, refs in zip(ids, ref_lists):
    gts[k] = tokens[offset:offset + len(refs)]
    offset += len(refs)

  # The scorers print progress to stdout; keep the training log readable.
  with contextlib.redirect_stdout(io.StringIO()):
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["rouge_l"] = float(rouge_l)
    scores["cider"] = float(cider)
    if protocol == COCO:
      scores["meteor"] = _meteor(gts, res)
  scores["protocol"] = protocol
  return scores


# Words a finished English caption does not end on: a caption that does
# was cut off mid-phrase ("... sitting on a"), the known failure of
# self-critical training without EOS in its rewards. The list is
# `bad_endings` of ruotianluo/self-critical.pytorch,
# captioning/utils/eval_utils.py, whose `bad_count_rate` is the share of
# captions ending on one of them.
BAD_ENDINGS = frozenset((
    "a", "an", "the", "in", "for", "at", "of", "with", "before", "after",
    "on", "upon", "near", "to", "is", "are", "am"))


def function_word_endings(captions: Sequence[str]) -> float:
  """Share of captions whose last word is one of `BAD_ENDINGS`.

  ruotianluo/self-critical.pytorch's `bad_count_rate` over the same word
  list; the captions' words are `vocabulary.tokenize`'s, where theirs are
  split on spaces (their captions are already lowercase words).

  Args:
    captions: generated captions; an empty caption does not count.

  Returns:
    The share in [0, 1] (0.0 for no captions).
  """
  ends = [(vocabulary.tokenize(c) or [""])[-1] for c in captions]
  return sum(e in BAD_ENDINGS for e in ends) / len(ends) if ends else 0.0


def caption_statistics(captions: Sequence[str],
                       training_captions: Iterable[str]) -> dict[str, float]:
  """What ruotianluo/self-critical's evaluation reports beside the scores.

  Captions are compared as `vocabulary.tokenize` words, so case and
  punctuation do not make a caption new.

  Args:
    captions: generated captions, one per image.
    training_captions: every reference caption of the training split.

  Returns:
    `mean_length` (words per caption), `distinct_words` (words used at
    least once), `novel` (share of captions that are not verbatim a
    training reference) and `function_word_endings`.
  """
  words = [vocabulary.tokenize(c) for c in captions]
  seen = {" ".join(vocabulary.tokenize(c)) for c in training_captions}
  count = max(len(words), 1)
  return {
      "mean_length": sum(len(w) for w in words) / count,
      "distinct_words": len({word for w in words for word in w}),
      "novel": sum(" ".join(w) not in seen for w in words) / count,
      "function_word_endings": function_word_endings(captions),
  }


def _mentions(words: Sequence[str]) -> list[tuple[int, str, str]]:
  """(position, colour, shape) of every shape word, in order.

  The colour is the last colour word after the previous shape word, or ""
  when there is none.
  """
  mentions = []
  color = ""
  for t, word in enumerate(words):
    if word in _COLOR_WORDS:
      color = word
    elif word in _SHAPE_WORDS:
      mentions.append((t, color, word))
      color = ""
  return mentions


def parse_objects(caption: str) -> list[tuple[str, str]]:
  """The (colour, shape) objects a shapes-set caption mentions, in order.

  Every shape word (`shapes_words.SHAPES`) is one mention; its colour is the
  closest colour word (`shapes_words.COLORS`) before it and after the previous
  shape word, or "" when there is none ("a circle" -> [("", "circle")]).
  Other words, and colour words with no shape after them, are ignored.

  Args:
    caption: a caption; it is lowercased and punctuation is dropped.

  Returns:
    A list of (colour, shape) pairs.
  """
  return [(color, shape)
          for _, color, shape in _mentions(vocabulary.tokenize(caption))]


def content_f1(
    predictions: Sequence[str],
    objects: Sequence[Sequence[tuple[str, str]]],
) -> dict[str, float]:
  """Micro-averaged precision, recall and F1 of the objects captions name.

  For image i, P_i is the multiset of `parse_objects(predictions[i])` and G_i
  the multiset of (colour, shape) in `objects[i]`. With TP = sum_i |P_i & G_i|
  (multiset intersection), precision = TP / sum_i |P_i|, recall =
  TP / sum_i |G_i| and F1 = 2 precision recall / (precision + recall); each is
  0.0 when its denominator is 0. A shape with the wrong or no colour counts
  as a false positive and leaves its object missed.

  Args:
    predictions: one generated caption per image.
    objects: per image, the ground-truth (colour, shape) pairs.

  Returns:
    "content_precision", "content_recall" and "content_f1" as floats.
  """
  if len(predictions) != len(objects):
    raise ValueError(f"Got {len(predictions)} captions but {len(objects)} "
                     "object lists; pass one object list per caption.")
  true_pos = num_pred = num_true = 0
  for caption, truth in zip(predictions, objects):
    predicted = collections.Counter(parse_objects(caption))
    actual = collections.Counter(tuple(o) for o in truth)
    true_pos += sum((predicted & actual).values())
    num_pred += sum(predicted.values())
    num_true += sum(actual.values())
  precision = true_pos / num_pred if num_pred else 0.0
  recall = true_pos / num_true if num_true else 0.0
  f1 = (2 * precision * recall / (precision + recall)
        if precision + recall else 0.0)
  return {
      "content_precision": float(precision),
      "content_recall": float(recall),
      "content_f1": float(f1),
  }


def _name(value: Any, names: list[str]) -> str:
  """A colour or shape name from a name or a ClassLabel index."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    return value
  return names[int(value)]


def _grounding_cells(
    tokens: Sequence[Sequence[str]],
    alphas: Sequence[np.ndarray] | None,
    objects: Sequence[Sequence[Mapping[str, Any]]],
    grid_hw: tuple[int, int],
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """Per correctly named shape: which cells lie on it, and its attention.

  Yields, for each mention `attention_grounding` counts, a bool [H * W]
  (cell r * W + c overlaps, with positive area, the box of an object of the
  mention's colour and shape) and the mention's attention row [H * W] (None
  without `alphas`).
  """
  grid_h, grid_w = grid_hw
  rows = np.arange(grid_h * grid_w) // grid_w
  cols = np.arange(grid_h * grid_w) % grid_w
  top, bottom = rows / grid_h, (rows + 1) / grid_h
  left, right = cols / grid_w, (cols + 1) / grid_w
  for i, (words, truth) in enumerate(zip(tokens, objects)):
    alpha = None
    if alphas is not None:
      alpha = np.asarray(alphas[i])
      if (alpha.ndim != 2 or alpha.shape[1] != grid_h * grid_w or
          alpha.shape[0] < len(words)):
        raise ValueError(
            f"Attention of shape {alpha.shape} does not fit {len(words)} "
            f"words on a {grid_h}x{grid_w} grid; pass [T >= words, H * W] per "
            "caption.")
    boxes = collections.defaultdict(list)
    for o in truth:
      key = (_name(o["color"], shapes_words.COLORS),
             _name(o["shape"], shapes_words.SHAPES))
      boxes[key].append(np.asarray(o["bbox"], dtype=np.float64))
    for t, color, shape in _mentions(list(words)):
      if (color, shape) not in boxes:
        continue
      on_shape = np.zeros(grid_h * grid_w, bool)
      for ymin, xmin, ymax, xmax in boxes[(color, shape)]:
        on_shape |= ((top < ymax) & (bottom > ymin) & (left < xmax)
                     & (right > xmin))
      yield on_shape, None if alpha is None else alpha[t]


def attention_grounding(
    tokens: Sequence[Sequence[str]],
    alphas: Sequence[np.ndarray],
    objects: Sequence[Sequence[Mapping[str, Any]]],
    grid_hw: tuple[int, int],
) -> float:
  """Share of correctly named shapes whose attention peak lies on the shape.

  For caption i and each position t where tokens[i][t] is a shape word, the
  mention's colour is read as in `parse_objects`. The mention counts when
  some ground-truth object of image i has that colour and shape; it is
  grounded when the peak cell r, c = divmod(argmax(alphas[i][t]), W) overlaps
  (with positive area) the box of such an object. Cell (r, c) covers
  [r / H, (r + 1) / H] x [c / W, (c + 1) / W] of the image in normalised
  coordinates. The result is grounded / counted, or 0.0 when nothing counts.

  Args:
    tokens: per caption, the generated words (without BOS/EOS).
    alphas: per caption, attention weights [T, H * W] with T >= len(tokens[i]);
      row t is the attention used to emit tokens[i][t], row-major over the
      grid.
    objects: per image, dicts with "bbox" (normalised ymin, xmin, ymax, xmax),
      "color" and "shape" (names, or ClassLabel indices into
      shapes_words.COLORS and shapes_words.SHAPES, as TFDS returns them).
    grid_hw: (H, W) of the feature grid the attention is over.

  Returns:
    The grounded share in [0, 1].
  """
  if not len(tokens) == len(alphas) == len(objects):
    raise ValueError(f"Got {len(tokens)} captions, {len(alphas)} attention "
                     f"maps and {len(objects)} object lists; pass one of each "
                     "per image.")
  hits = [bool(on_shape[np.argmax(alpha)]) for on_shape, alpha in
          _grounding_cells(tokens, alphas, objects, grid_hw)]
  return float(np.mean(hits)) if hits else 0.0


def grounding_chance(
    tokens: Sequence[Sequence[str]],
    objects: Sequence[Sequence[Mapping[str, Any]]],
    grid_hw: tuple[int, int],
) -> float:
  """`attention_grounding` of a peak cell drawn uniformly at random.

  The expectation, not a draw: the mean over the counted mentions of the
  share of grid cells that lie on the named shape. Large shapes on a coarse
  grid are hit often by chance; this is the baseline a grounding score is
  read against.

  Args:
    tokens, objects, grid_hw: as for `attention_grounding`.

  Returns:
    The expected grounded share in [0, 1] (0.0 when nothing counts).
  """
  if len(tokens) != len(objects):
    raise ValueError(f"Got {len(tokens)} captions and {len(objects)} object "
                     "lists; pass one of each per image.")
  shares = [on_shape.mean() for on_shape, _ in
            _grounding_cells(tokens, None, objects, grid_hw)]
  return float(np.mean(shares)) if shares else 0.0
