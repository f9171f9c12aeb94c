"""A worker for test_multiprocess.py's evaluation test (not a test module).

  python tests/multiprocess_eval_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID \
      PORT WORKDIR DATA_DIR

Scores the run in WORKDIR on its test split (the data in DATA_DIR) twice:
with `tools.evaluate.evaluate_run`, then, compiled by then, with
`evaluator.evaluate` and attention figures; times every decoding call and
pickles what this process got back to OUT_DIR/eval_<id>.pkl.
NUM_PROCESSES=1 runs alone (no coordinator).
"""

import json
import os
import pickle
import sys
import time

import jax
import ml_collections

from visionspeak_jax.data import sources
from visionspeak_jax.evaluation import evaluator
from visionspeak_jax.models import captioner
from visionspeak_jax.platform import distributed
from visionspeak_jax.run import restore
from visionspeak_jax.tools import evaluate

_compiled = []  # The timed p_predict that evaluate_run compiled.
_times = []  # Seconds of each decoding call, in order.


def _timed_compile_predict(config, devices=None,
                           _real=captioner.compile_predict):
  p_predict = _real(config, devices)

  def timed(*args):
    start = time.perf_counter()
    out = jax.block_until_ready(p_predict(*args))
    _times.append(time.perf_counter() - start)
    return out

  _compiled.append(timed)
  return timed


def main():
  out_dir, num_processes, process_id, port, workdir, data_dir = sys.argv[1:7]
  num_processes, process_id = int(num_processes), int(process_id)
  if num_processes > 1:
    distributed.initialize(ml_collections.ConfigDict({
        "distributed": "auto", "coordinator_address": f"127.0.0.1:{port}",
        "num_processes": num_processes, "process_id": process_id}))
  assert jax.process_count() == num_processes, jax.process_count()
  assert jax.local_device_count() == 1, jax.local_devices()

  captioner.compile_predict = _timed_compile_predict
  start = time.perf_counter()
  report = evaluate.evaluate_run(workdir, data_dir=data_dir, num_examples=-1)
  first_run_s = time.perf_counter() - start
  first_calls, _times[:] = list(_times), []
  captions = None
  if process_id == 0:  # The writer; the others may finish before it wrote.
    with open(report["captions"]) as f:
      captions = json.load(f)

  # Again, compiled: these decoding calls are the decode time alone.
  run = restore.restore_run(workdir)
  config = evaluate.settings(run.config, num_examples=-1, data_dir=data_dir)
  source = sources.create(config, workdir)
  shown = []
  start = time.perf_counter()
  result = evaluator.evaluate(_compiled[0], run.params, run.batch_stats,
                              source, config, run.vocab, config.test_split,
                              shown)
  evaluate_s = time.perf_counter() - start
  with open(os.path.join(out_dir, f"eval_{process_id}.pkl"), "wb") as f:
    pickle.dump({
        "report_metrics": report["metrics"], "captions": captions,
        "metrics": result.metrics, "predictions": result.predictions,
        "shown": [(s.image, s.words, s.alphas, s.reference) for s in shown],
        "decode_s": sum(_times), "decode_calls": len(_times),
        "evaluate_s": evaluate_s, "first_run_s": first_run_s,
        "first_run_calls": first_calls}, f)


if __name__ == "__main__":
  main()
