"""Tests of the caption metrics and the shapes-set content and grounding."""

import shutil
import time

from absl import logging
import numpy as np
import psutil
import pytest

from visionspeak_jax.data.datasets import shapes_words
from visionspeak_jax.evaluation import metrics

_HAVE_JAVA = shutil.which("java") is not None

_REFERENCES = {
    1: ["a red circle to the left of a blue square",
        "a blue square to the right of a red circle"],
    2: ["a small green triangle above a yellow diamond",
        "a yellow diamond below a green triangle"],
    3: ["a purple circle on a plain background", "a large purple circle"],
}
_EXACT = {1: "a red circle to the left of a blue square",
          2: "a yellow diamond below a green triangle",
          3: "a large purple circle"}
_WRONG = {1: "a green diamond above an orange triangle",
          2: "a red circle to the right of a blue circle",
          3: "two shapes from left to right"}


def test_exact_captions_score_full_marks():
  scores = metrics.caption_metrics(_REFERENCES, _EXACT,
                                   protocol="regex-tokens")
  assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l",
                         "cider", "protocol"}
  assert scores["protocol"] == "regex-tokens"
  for name in ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"]:
    assert scores[name] == pytest.approx(1.0, abs=1e-6), name
  # pycocoevalcap's CIDEr-D (x10) of these three images; not bounded by 1.
  assert scores["cider"] == pytest.approx(6.5328, abs=1e-3)


def test_wrong_captions_score_lower():
  exact = metrics.caption_metrics(_REFERENCES, _EXACT, protocol="regex-tokens")
  wrong = metrics.caption_metrics(_REFERENCES, _WRONG, protocol="regex-tokens")
  for name in exact:
    if name != "protocol":
      assert wrong[name] < exact[name] - 0.2, name
  # No 4-gram of a wrong caption is in its references.
  assert wrong["bleu4"] < 1e-6


def test_simple_tokenizer_ignores_case_and_punctuation():
  shouting = {k: v.upper().replace(" to ", ", to ") + "."
              for k, v in _EXACT.items()}
  scores = metrics.caption_metrics(_REFERENCES, shouting, protocol="regex-tokens")
  assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_scorers_keep_stdout_quiet(capsys):
  metrics.caption_metrics(_REFERENCES, _WRONG, protocol="regex-tokens")
  assert capsys.readouterr().out == ""


def test_bad_inputs_give_one_clear_error(monkeypatch):
  with pytest.raises(ValueError, match="no reference captions"):
    metrics.caption_metrics({1: ["a red circle"]}, {2: "a red circle"})
  with pytest.raises(ValueError, match="at least one prediction"):
    metrics.caption_metrics(_REFERENCES, {})
  with pytest.raises(ValueError, match="Unknown metric protocol 'ptb'"):
    metrics.caption_metrics(_REFERENCES, _EXACT, protocol="ptb")
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(ValueError, match="protocol='regex-tokens'"):
    metrics.caption_metrics(_REFERENCES, _EXACT, protocol="coco")


def test_without_java_meteor_is_skipped(monkeypatch, caplog):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  # Fresh log_first_n counts, so that an earlier test that already logged the
  # warning cannot hide it here.
  monkeypatch.setattr(logging, "_log_counter_per_token", {})
  scores = metrics.caption_metrics(_REFERENCES, _EXACT)
  assert "meteor" not in scores
  assert scores["protocol"] == "regex-tokens"  # "auto" without Java.
  assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
  metrics.caption_metrics(_REFERENCES, _EXACT)
  # Said once per process, not once per call.
  notes = [r for r in caplog.records
           if "regex-tokens protocol, not COCO's" in r.getMessage()]
  assert len(notes) == 1


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_JAVA, reason="needs a Java runtime")
def test_java_scorers_run_and_clean_up():
  before = {p.pid for p in psutil.Process().children(recursive=True)}
  start = time.time()
  exact = metrics.caption_metrics(_REFERENCES, _EXACT, protocol="coco")
  wrong = metrics.caption_metrics(
      _REFERENCES, {k: v.capitalize() + "." for k, v in _WRONG.items()})
  assert time.time() - start < 60
  assert exact["meteor"] == pytest.approx(1.0, abs=1e-3)
  assert exact["protocol"] == wrong["protocol"] == "coco"
  assert 0.0 < wrong["meteor"] < 0.1  # 0.031 with the bundled METEOR 1.5.
  # The PTB tokenizer drops case and the final period.
  assert wrong["bleu1"] == pytest.approx(
      metrics.caption_metrics(_REFERENCES, _WRONG, protocol="regex-tokens")["bleu1"])
  assert exact["bleu4"] == pytest.approx(1.0, abs=1e-6)
  # No JVM is left behind.
  alive = [p for p in psutil.Process().children(recursive=True)
           if p.pid not in before and p.is_running() and
           p.status() != psutil.STATUS_ZOMBIE]
  assert not alive


class _DeadMeteor(metrics.Meteor):
  """A METEOR scorer whose JVM dies before it scores anything."""

  def __init__(self):
    super().__init__()
    self.meteor_p.kill()
    self.meteor_p.wait()


@pytest.mark.skipif(not _HAVE_JAVA, reason="needs a Java runtime")
def test_meteor_failure_is_clear_and_does_not_hang(monkeypatch):
  monkeypatch.setattr(metrics, "Meteor", _DeadMeteor)
  gts = {k: v for k, v in _REFERENCES.items()}
  res = {k: [v] for k, v in _EXACT.items()}
  with pytest.raises(RuntimeError, match="protocol='regex-tokens'"):
    metrics._meteor(gts, res)


@pytest.mark.skipif(not _HAVE_JAVA, reason="needs a Java runtime")
def test_shared_meteor_scores_with_one_jvm_and_stops_it(monkeypatch):
  started = []

  class CountedMeteor(metrics.Meteor):

    def __init__(self):
      super().__init__()
      started.append(self)

  monkeypatch.setattr(metrics, "Meteor", CountedMeteor)
  before = {p.pid for p in psutil.Process().children(recursive=True)}
  alone = metrics.caption_metrics(_REFERENCES, _WRONG, protocol="coco")
  assert len(started) == 1 and started[0].meteor_p.poll() is not None
  with metrics.shared_meteor():
    assert len(started) == 2  # Started on entry, to load while runs train.
    with metrics.shared_meteor():  # Nested: the same one.
      shared = [metrics.caption_metrics(_REFERENCES, _WRONG, protocol="coco")
                for _ in range(2)]
    assert len(started) == 2 and started[1].meteor_p.poll() is None
  assert started[1].meteor_p.poll() is not None  # Stopped on leaving.
  assert shared == [alone, alone]
  alive = [p for p in psutil.Process().children(recursive=True)
           if p.pid not in before and p.is_running() and
           p.status() != psutil.STATUS_ZOMBIE]
  assert not alive


def test_function_word_endings():
  # "and" is not among ruotianluo's bad endings; "is" and "near" are.
  assert metrics.function_word_endings(
      ["a red circle on a", "A red circle.", "two shapes and", "", "of the"
       " square to", "a circle near", "the square is"]) == pytest.approx(4 / 7)
  assert metrics.function_word_endings(["a circle in the"]) == 1.0
  assert metrics.function_word_endings([]) == 0.0


def test_bad_endings_are_ruotianluos_list():
  # ruotianluo/self-critical.pytorch, captioning/utils/eval_utils.py
  # (HEAD 4c48a33): `bad_endings`, with "the" appended twice.
  theirs = ["a", "an", "the", "in", "for", "at", "of", "with", "before",
            "after", "on", "upon", "near", "to", "is", "are", "am", "the"]
  assert metrics.BAD_ENDINGS == frozenset(theirs)


def test_no_jvm_starts_where_meteor_is_not_scored(monkeypatch):

  class NoMeteor:

    def __init__(self):
      raise AssertionError("a METEOR JVM was started")

  monkeypatch.setattr(metrics, "Meteor", NoMeteor)
  with metrics.shared_meteor("regex-tokens"):
    assert not metrics._shared
    scores = metrics.caption_metrics(_REFERENCES, _WRONG, protocol="regex-tokens")
  assert "meteor" not in scores
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  with metrics.shared_meteor():  # No Java on the PATH.
    assert not metrics._shared
  assert metrics.metric_names(protocol="auto", has_objects=False) == (
      "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider",
      "function_word_endings")
  assert set(metrics.metric_names(protocol="coco", has_objects=True)) >= {
      "meteor", "content_f1", "grounding", "grounding_chance"}


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_JAVA, reason="needs a Java runtime")
def test_shared_meteor_restarts_after_a_failure(monkeypatch):
  gts = {k: v for k, v in _REFERENCES.items()}
  res = {k: [v] for k, v in _EXACT.items()}
  with metrics.shared_meteor():
    metrics._shared[0].meteor_p.kill()  # The JVM dies mid-run.
    metrics._shared[0].meteor_p.wait()
    with pytest.raises(RuntimeError, match="protocol='regex-tokens'"):
      metrics._meteor(gts, res)
    assert metrics._shared == [None]
    assert metrics._meteor(gts, res) == pytest.approx(1.0, abs=1e-3)
  assert not metrics._shared


@pytest.mark.skipif(not _HAVE_JAVA, reason="needs a Java runtime")
def test_close_meteor_stops_the_jvm_and_frees_the_lock():
  scorer = metrics.Meteor()
  scorer.lock.acquire()  # As a failed compute_score leaves it.
  metrics._close_meteor(scorer)
  assert scorer.meteor_p.poll() is not None
  assert not scorer.lock.locked()  # Else Meteor.__del__ would block forever.


@pytest.mark.skipif(not _HAVE_JAVA, reason="needs a Java runtime")
def test_ptb_tokenizer_keeps_one_line_per_caption():
  captions = ["A man, riding a horse.", "", "Don't stop!", "two\nlines"]
  assert metrics._ptb_tokenize(captions) == [
      "a man riding a horse", "", "do n't stop", "two lines"]


def test_parse_objects():
  assert metrics.parse_objects(
      "a red circle which is above a large orange diamond") == [
          ("red", "circle"), ("orange", "diamond")]
  # The colour closest to the shape wins; a colour after the last shape and
  # a colour before an earlier shape do not carry over.
  assert metrics.parse_objects("a red blue circle and a square green") == [
      ("blue", "circle"), ("", "square")]
  assert metrics.parse_objects("A Yellow Triangle.") == [("yellow",
                                                          "triangle")]
  assert metrics.parse_objects("two shapes") == []


def test_content_f1_exact_numbers():
  predictions = [
      "a red circle to the left of a blue square",  # 2 right of 2.
      "a green triangle and a green triangle",  # 1 right, 1 extra, 1 missed.
      "a circle",  # Colourless: wrong, and both objects missed.
  ]
  objects = [
      [("red", "circle"), ("blue", "square")],
      [("green", "triangle"), ("yellow", "diamond")],
      [("red", "circle"), ("purple", "diamond")],
  ]
  scores = metrics.content_f1(predictions, objects)
  # TP = 3, predicted = 5, true = 6.
  assert scores["content_precision"] == pytest.approx(0.6)
  assert scores["content_recall"] == pytest.approx(0.5)
  assert scores["content_f1"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)
  assert metrics.content_f1(["two shapes"], [[("red", "circle")]]) == {
      "content_precision": 0.0, "content_recall": 0.0, "content_f1": 0.0}
  with pytest.raises(ValueError, match="one object list per caption"):
    metrics.content_f1(["a red circle"], [])


def _grounding_case():
  # 2x2 grid: cells 0 1 / 2 3 (row-major).
  words = ("a red circle and a blue square and a green triangle").split()
  alpha = np.full((len(words) + 1, 4), 0.1)  # One extra row, as for EOS.
  alpha[2, 0] = 0.7  # "circle" looks top-left, where the red circle is.
  alpha[6, 1] = 0.7  # "square" looks top-right; the square is bottom-right.
  alpha[10, 3] = 0.7  # "triangle": no green triangle in the image.
  objects = [
      {"bbox": (0.0, 0.0, 0.5, 0.5), "color": "red", "shape": "circle"},
      # Touches the top-right cell only along its edge, which is no overlap.
      {"bbox": (0.5, 0.5, 1.0, 1.0), "color": "blue", "shape": "square"},
  ]
  return words, alpha, objects


def test_attention_grounding_hand_made():
  words, alpha, objects = _grounding_case()
  assert metrics.attention_grounding([words], [alpha], [objects],
                                     (2, 2)) == pytest.approx(0.5)
  # Looking at the square's cell grounds it too.
  alpha[6] = [0.1, 0.1, 0.1, 0.7]
  assert metrics.attention_grounding([words], [alpha], [objects],
                                     (2, 2)) == pytest.approx(1.0)
  # ClassLabel indices, as TFDS returns them, mean the same.
  indexed = [dict(o, color=shapes_words.COLORS.index(o["color"]),
                  shape=shapes_words.SHAPES.index(o["shape"]))
             for o in objects]
  assert metrics.attention_grounding([words], [alpha], [indexed],
                                     (2, 2)) == pytest.approx(1.0)
  # A caption with no matching shape word counts for nothing.
  assert metrics.attention_grounding([["a", "green", "triangle"]],
                                     [np.eye(3, 4)], [objects], (2, 2)) == 0.0


def test_grounding_chance_is_the_share_of_cells_on_the_shape():
  words, _, objects = _grounding_case()
  # The red circle covers 1 of 4 cells, the blue square 1 (its edge
  # contact with the top-right cell is no overlap); no green triangle.
  assert metrics.grounding_chance([words], [objects], (2, 2)) == 0.25
  bigger = [dict(objects[0], bbox=(0.0, 0.0, 0.6, 0.6)), objects[1]]
  assert metrics.grounding_chance([words], [bigger], (2, 2)) == (
      pytest.approx((4 / 4 + 1 / 4) / 2))
  # It is what peak cells drawn at random score on average.
  rng = np.random.default_rng(0)
  draws = [metrics.attention_grounding(
      [words], [np.eye(4)[rng.integers(0, 4, len(words))]], [bigger], (2, 2))
           for _ in range(4000)]
  assert np.mean(draws) == pytest.approx(0.625, abs=0.02)
  assert metrics.grounding_chance([["a", "green", "triangle"]], [objects],
                                  (2, 2)) == 0.0
  with pytest.raises(ValueError, match="one of each"):
    metrics.grounding_chance([words], [], (2, 2))


def test_attention_grounding_rejects_bad_shapes():
  words, alpha, objects = _grounding_case()
  with pytest.raises(ValueError, match="does not fit"):
    metrics.attention_grounding([words], [alpha], [objects], (3, 3))
  with pytest.raises(ValueError, match="one of each"):
    metrics.attention_grounding([words], [], [objects], (2, 2))


def test_shapes_metrics_are_fast():
  words, alpha, objects = _grounding_case()
  caption = " ".join(words)
  start = time.time()
  metrics.content_f1([caption] * 1000,
                     [[("red", "circle"), ("blue", "square")]] * 1000)
  metrics.attention_grounding([words] * 1000, [alpha] * 1000,
                              [objects] * 1000, (2, 2))
  assert time.time() - start < 1.0
