"""The coco metric protocol scores as the COCO caption evaluation does.

pycocotools' `COCO` and `COCO.loadRes` read an annotation file and a results
file, and pycocoevalcap's `COCOEvalCap` scores them: the code behind the
published numbers (ruotianluo/self-critical.pytorch's `language_eval` in
captioning/utils/eval_utils.py runs the same three). Under the coco
protocol this project's scores must equal theirs to the last digit.
"""

import contextlib
import io
import json
import os
import shutil

from pycocoevalcap import eval as cocoevalcap
from pycocotools import coco as cocotools
import pytest

from visionspeak_jax.evaluation import metrics
from visionspeak_jax.tools import evaluate

# This project's metric name -> COCOEvalCap's.
_NAMES = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3",
          "bleu4": "Bleu_4", "meteor": "METEOR", "rouge_l": "ROUGE_L",
          "cider": "CIDEr"}

pytestmark = pytest.mark.skipif(shutil.which("java") is None,
                                reason="the coco protocol needs Java")


class _WithoutSpice:
  """Stands in for COCOEvalCap's SPICE scorer, which this project does not
  report: its jar fetches Stanford CoreNLP models from the web on first
  use, and the tests run offline. The other scorers are pycocoevalcap's."""

  def method(self):
    return "SPICE"

  def compute_score(self, gts, res):
    del res
    return float("nan"), [float("nan")] * len(gts)


def _coco_eval_cap(references, results_file, directory, monkeypatch):
  """COCOEvalCap's scores of a results file against `references`.

  Args:
    references: image id -> reference captions, in the order to score.
    results_file: a COCO results file, [{"image_id", "caption"}].
    directory: where to write the annotation file.
    monkeypatch: pytest's, to leave SPICE out.

  Returns:
    COCOEvalCap's `eval`: {"Bleu_1": ..., "CIDEr": ...}.
  """
  annotations = {
      "info": {}, "licenses": [], "type": "captions",
      "images": [{"id": image_id} for image_id in references],
      "annotations": [
          {"id": n + 1, "image_id": image_id, "caption": caption}
          for n, (image_id, caption) in enumerate(
              (i, c) for i, refs in references.items() for c in refs)],
  }
  path = os.path.join(directory, "captions_annotations.json")
  with open(path, "w") as f:
    json.dump(annotations, f)
  monkeypatch.setattr(cocoevalcap, "Spice", _WithoutSpice)
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth = cocotools.COCO(path)
    results = ground_truth.loadRes(results_file)
    scorer = cocoevalcap.COCOEvalCap(ground_truth, results)
    # As ruotianluo's language_eval: the images that have results.
    scorer.params["image_id"] = results.getImgIds()
    scorer.evaluate()
  return scorer.eval


# Case, punctuation, a possessive and a hyphen: where the PTB tokenizer and
# the vocabulary's regex part ways.
_REFERENCES = {
    391895: ["A man riding a wave on top of a surfboard.",
             "A surfer rides the large wave in the ocean!"],
    522418: ["Two dogs playing with a frisbee, on the grass.",
             "The dog's owner throws a red-and-white disc."],
    184613: ["A plate of food with broccoli and rice.",
             "Some broccoli, rice & chicken on a plate"],
    318219: ["A cat sitting on a laptop's keyboard.",
             "a grey cat lies on the open computer"],
    554625: ["People stand near a train at the station.",
             "A crowd waits as the train pulls in"],
}
_PREDICTIONS = {391895: "a man riding a wave on a surfboard",
                522418: "Two dogs play with a frisbee.",
                184613: "a plate of food with broccoli",
                318219: "a cat sitting on a keyboard",
                554625: "a train at the station near people"}


def test_coco_protocol_equals_cocoevalcap_on_a_handful(tmp_path,
                                                       monkeypatch):
  results_file = str(tmp_path / "results.json")
  with open(results_file, "w") as f:
    json.dump([{"image_id": k, "caption": v} for k, v in
               _PREDICTIONS.items()], f)
  theirs = _coco_eval_cap(_REFERENCES, results_file, str(tmp_path),
                          monkeypatch)
  ours = metrics.caption_metrics(_REFERENCES, _PREDICTIONS, protocol="coco")
  assert ours.pop("protocol") == "coco"
  assert ours == {name: theirs[key] for name, key in _NAMES.items()}
  # The fallback tokenizes otherwise ("dog's" is one word to the regex, two
  # to the PTB tokenizer) and says so.
  fallback = metrics.caption_metrics(_REFERENCES, _PREDICTIONS,
                                     protocol="regex-tokens")
  assert fallback["protocol"] == "regex-tokens"
  assert fallback["cider"] != ours["cider"]


@pytest.mark.slow
def test_evaluate_commands_results_file_scores_as_cocoevalcap(
    tiny_run, tiny_data_dir, tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from visionspeak_jax.data.datasets import shapes  # pylint: disable=g-import-not-at-top,unused-import
  # The tiny run scored itself with regex-tokens; this scores its whole
  # test split with the coco protocol.
  report = evaluate.evaluate_run(tiny_run, data_dir=tiny_data_dir,
                                 num_examples=-1, metrics_protocol="coco")
  assert report["captions"] == os.path.join(tiny_run, "eval",
                                            "test_step2_beam3.json")
  with open(report["captions"]) as f:
    results = json.load(f)
  # The annotation file: the split's references, read from TFDS itself,
  # in the order of the results.
  split = tfds.as_numpy(tfds.load("shapes_captions/tiny", split="test",
                                  data_dir=tiny_data_dir))
  references = {int(ex["image/id"]): [c.decode("utf-8") for c in
                                      ex["captions"]["text"]]
                for ex in split}
  assert len(results) == len(references) == report["metrics"]["num_images"]
  references = {r["image_id"]: references[r["image_id"]] for r in results}
  theirs = _coco_eval_cap(references, report["captions"], str(tmp_path),
                          monkeypatch)
  with open(report["captions"][:-len(".json")] + "_scores.json") as f:
    saved = json.load(f)
  for scores in (report["metrics"], saved["metrics"]):
    assert scores["protocol"] == "coco"
    assert {name: scores[name] for name in _NAMES} == {
        name: theirs[key] for name, key in _NAMES.items()}
  assert saved["settings"]["metrics_protocol"] == "coco"
