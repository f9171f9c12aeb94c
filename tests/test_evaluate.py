"""The evaluation command: a restored run scores as its training run did."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax.evaluation import metrics
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.tools import evaluate

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tiny_run, tiny_data_dir):
  """(workdir, data_dir): the tiny run, and where its data is now."""
  return tiny_run, tiny_data_dir


def _final_line(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  final = records[-1]
  assert final["split"] == "test"
  return {k: v for k, v in final.items() if k not in ("step", "split")}


def test_scores_equal_the_training_runs_final_line(trained):
  workdir, data_dir = trained
  report = evaluate.evaluate_run(workdir, data_dir=data_dir)
  final = _final_line(workdir)
  assert {k: report["metrics"][k] for k in final} == final
  assert report["step"] == 2 and report["split"] == "test"
  with open(os.path.join(workdir, "eval", "test_step2_beam3.json")) as f:
    captions = json.load(f)
  assert len(captions) == final["num_images"]
  assert all(set(c) == {"image_id", "caption"} and
             isinstance(c["image_id"], int) for c in captions)
  with open(os.path.join(workdir, "eval",
                         "test_step2_beam3_scores.json")) as f:
    saved = json.load(f)
  assert saved["metrics"] == report["metrics"]
  assert saved["settings"]["beam_size"] == 3
  # The tiny config scores without Java, and every output says so.
  assert final["protocol"] == saved["metrics"]["protocol"] == "regex-tokens"
  assert saved["settings"]["metrics_protocol"] == "regex-tokens"
  for key in ("mean_length", "distinct_words", "novel",
              "function_word_endings"):
    assert key in saved["metrics"], key


def test_settings_override_the_runs_and_name_the_files(trained):
  workdir, data_dir = trained
  report = evaluate.evaluate_run(workdir, best=True, split="validation",
                                 beam_size=1, num_examples=4,
                                 data_dir=data_dir)
  assert report["settings"]["beam_size"] == 1
  assert report["metrics"]["num_images"] == 4
  assert report["split"] == "validation"
  assert os.path.exists(os.path.join(workdir, "eval",
                                     "validation_step2_beam1.json"))
  with pytest.raises(errors.ConfigError, match="beam_size"):
    evaluate.evaluate_run(workdir, beam_size=0, data_dir=data_dir)


def test_saved_config_is_read_without_starting_jax(trained, tmp_path):
  workdir, _ = trained
  code = ("import jax\n"
          "from jax._src import xla_bridge\n"
          "from visionspeak_jax.run import checkpoint\n"
          f"c = checkpoint.saved_config({workdir + '/checkpoints'!r})\n"
          "assert c.eval_batch_size == 8, c.eval_batch_size\n"
          "assert not xla_bridge._backends\n"
          f"assert checkpoint.saved_config({str(tmp_path)!r}) is None\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=_REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert checkpoint_lib.saved_config(
      os.path.join(workdir, "checkpoints"), step=7) is None


def test_settings_resolve_the_metric_protocol(monkeypatch):
  config = tiny.get_config()
  config.metrics_protocol = "auto"
  monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
  assert evaluate.settings(config).metrics_protocol == "coco"
  assert evaluate.settings(
      config, metrics_protocol="regex-tokens").metrics_protocol == (
          "regex-tokens")
  # A run saved before the field existed said it with metrics_use_java;
  # its config is completed as it is read.
  old = config.to_dict()
  del old["metrics_protocol"]
  for use_java, protocol in ((None, "coco"), (True, "coco"),
                             (False, "regex-tokens")):
    old["metrics_use_java"] = use_java
    saved = checkpoint_lib.complete_saved_config(
        ml_collections.ConfigDict(old))
    assert evaluate.settings(saved).metrics_protocol == protocol
  monkeypatch.setattr(shutil, "which", lambda name: None)
  assert evaluate.settings(config).metrics_protocol == "regex-tokens"
  with pytest.raises(errors.ConfigError,
                     match="--metrics_protocol=regex-tokens"):
    evaluate.settings(config, metrics_protocol="coco")


def test_caption_statistics_by_hand():
  stats = metrics.caption_statistics(
      ["A red circle.", "a blue square on", "a red circle"],
      ["a red circle", "a green star"])
  assert stats == {"mean_length": 10 / 3, "distinct_words": 6,
                   "novel": pytest.approx(1 / 3),
                   "function_word_endings": pytest.approx(1 / 3)}
  # ruotianluo's bad endings, not any function word: "and" is not one.
  assert metrics.caption_statistics(
      ["a red circle and", "a circle near"], [])["function_word_endings"] == (
          0.5)


@pytest.mark.slow
def test_command_prints_the_line_and_bad_input_in_one_line(trained, tmp_path):
  workdir, data_dir = trained

  def command(*args):
    return subprocess.run(
        [sys.executable, "-m", "visionspeak_jax.tools.evaluate", *args],
        cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)

  ok = command(f"--workdir={workdir}", f"--data_dir={data_dir}")
  assert ok.returncode == 0, ok.stderr[-2000:]
  line = ok.stdout.splitlines()[0]
  final = _final_line(workdir)
  assert line.startswith("test, step 2, beam 3: protocol=regex-tokens, "
                         "bleu1=")
  assert f"bleu4={final['bleu4']:.4f}" in line
  assert f"cider={final['cider']:.4f}" in line
  for args, says in (
      ([f"--workdir={tmp_path / 'none'}"], "error: No checkpoint in"),
      ([f"--workdir={workdir}", f"--data_dir={data_dir}",
        "--split=no_such_split"], "error: Split 'no_such_split'"),
      ([f"--workdir={workdir}", f"--data_dir={data_dir}", "--min_length=99"],
       "error: config.min_length")):
    bad = command(*args)
    assert bad.returncode == 1, (args, bad.stderr[-2000:])
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith(says) and "Traceback" not in bad.stderr, last


def _repeats_a_trigram(caption):
  words = caption.split()
  trigrams = list(zip(words, words[1:], words[2:]))
  return len(set(trigrams)) < len(trigrams)


def test_decoding_constraints_reach_the_evaluation(trained):
  workdir, data_dir = trained

  def captions(**settings):
    report = evaluate.evaluate_run(workdir, beam_size=1, data_dir=data_dir,
                                   **settings)
    with open(report["captions"]) as f:
      return report, [c["caption"] for c in json.load(f)]

  _, free = captions()
  report, blocked = captions(block_trigrams=True)
  assert report["settings"]["block_trigrams"] is True
  # Two steps of training repeat words ("the the the orange the ...").
  assert any(_repeats_a_trigram(c) for c in free)
  assert blocked != free
