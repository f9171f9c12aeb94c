"""Training and evaluation of the captioner.

`train_and_evaluate` compiles the step of `step.py` and `captioner.predict`
and runs the loop: train, log, evaluate (`evaluation/evaluator.py`),
checkpoint, resume.

What is trained is set by two independent settings: where the inputs come
from (`config.data_source`, see `sources.py`: images through the ResNet, or a
feature cache and no ResNet) and how fast each parameter subtree learns
(`config.lr_mults`, see `optimizer.py`: 0 freezes a subtree). Where a run
starts is `restore.initial_weights`: a random init, pretrained encoder
weights, and/or an earlier run (`config.init_from`).
"""

import functools
import os
import time

from absl import logging
import flax
import jax
import ml_collections

from visionspeak_jax import errors
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.data import sources
from visionspeak_jax.evaluation import evaluator
from visionspeak_jax.evaluation import metrics as metrics_lib
from visionspeak_jax.platform import cpu_tuning
from visionspeak_jax.platform import dtypes
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore
from visionspeak_jax.run import summaries
from visionspeak_jax.run import workdir as workdir_lib
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.training import optimizer
from visionspeak_jax.training import scst
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib


def _resume_or_start(config: ml_collections.ConfigDict, workdir: str,
                     source: sources.DataSource,
                     ckpt: checkpoint_lib.Checkpointer
                     ) -> tuple[vocab_lib.Vocabulary, state_lib.TrainState]:
  """The vocabulary and state to train from: resumed, or a new run's.

  A run resumes from its newest intact checkpoint; a damaged newer one is
  logged and skipped. A new run builds its vocabulary (or takes that of
  `config.init_from`) and starts from `restore.initial_weights`.
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  create = functools.partial(state_lib.create_train_state, rng, config,
                             encoder=source.input_key == "image")

  def resume(step):
    vocab, saved = ckpt.restore_metadata(step)
    config_checks.check_resume(saved, config, workdir)
    return vocab, ckpt.restore_state(create(len(vocab)), step)

  resumed = ckpt.restore_newest_intact(resume)
  if resumed is not None:
    logging.info("Resuming from the checkpoint of step %d.", resumed[0])
    return resumed[1]
  init_run = None
  if config.init_from:
    init_run = restore.restore_run(config.init_from)
  # Before the vocabulary: on COCO that reads every training caption.
  restore.check_encoder_start(config, encoder=source.input_key == "image",
                              init_run=init_run)
  if init_run is not None:
    vocab = init_run.vocab  # The decoder copied from that run speaks it.
  else:
    vocab = vocab_lib.Vocabulary.build(source.captions(config.train_split),
                                       min_count=config.vocab_min_count)
  if jax.process_index() == 0:
    vocab.save(os.path.join(workdir, "vocab.json"))
  state = create(len(vocab))
  params, batch_stats = restore.initial_weights(
      config, state.params, state.batch_stats, init_run)
  return vocab, state.replace(params=params, batch_stats=batch_stats)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains, evaluates and checkpoints; resumes from the latest checkpoint.

  A run killed at any moment and restarted with the same config continues
  exactly: the state, the data order and every random key come back as they
  were. A second process on the same workdir is refused.

  Args:
    config: the run config.
    workdir: where checkpoints, the vocabulary and metrics.jsonl go.

  Returns:
    The final metrics on `config.test_split`.

  Raises:
    errors.UserError: a config, data, checkpoint or weights problem, or a
      diverging run, in one sentence.
  """
  # A run started without the entry point (`runtime.start`) resolves "auto"
  # here, so that its checkpoints save the dtypes it trained with.
  choice = dtypes.resolve(config)
  if choice:
    logging.info(choice)
  # Every mistake in the config stops the run here, in one sentence.
  config_checks.validate(config)
  # Saved resolved: tools.evaluate then scores the run as it scored itself.
  config.metrics_protocol = metrics_lib.resolve_protocol(
      config.metrics_protocol)
  logging.info("Metric protocol: %s.", config.metrics_protocol)
  config_checks.check_workdir(workdir)
  lock = workdir_lib.Lock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    # Only the lock holder writes (and cleans up) a run's checkpoints.
    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), write=True,
        max_to_keep=config.max_checkpoints_to_keep)
    best_ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "best"), write=True, max_to_keep=1,
        best_metric=config.best_metric)
    try:
      # METEOR's JVM loads while the run trains, once for all evaluations
      # (and only where METEOR will be scored: process 0).
      with evaluator.shared_meteor(config.metrics_protocol):
        return _train(config, workdir, ckpt, best_ckpt)
    finally:
      for c in (ckpt, best_ckpt):
        c.wait()  # What was saved is complete, even when the run stops.
        c.close()
  finally:
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str,
           ckpt: checkpoint_lib.Checkpointer,
           best_ckpt: checkpoint_lib.Checkpointer) -> dict[str, float]:
  """The body of `train_and_evaluate`, inside its lock."""
  source = sources.create(config, workdir)
  logging.info("Data: %s.", source.description)
  config_checks.check_best_metric(config, source.has_objects)
  vocab, state = _resume_or_start(config, workdir, source, ckpt)
  logging.info("Vocabulary: %d words.", len(vocab))
  state = step_lib.place_state(state)  # Else the second step compiles again.
  start_step = int(state.step)
  metrics_log = workdir_lib.MetricsLog(workdir, jax.process_index() == 0)
  metrics_log.resume(start_step)
  tensorboard = summaries.TensorBoardLog(workdir, jax.process_index() == 0)
  tensorboard.resume(start_step)
  learning_rate = optimizer.learning_rate_schedule(config)
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  p_train_step, p_predict = step_lib.compile_steps(config)
  if config.objective == "scst":
    references = scst.training_references(
        source.references(config.train_split), vocab,
        eos=config.scst.cider_eos)
    train_step = scst.SelfCriticalStep(
        config, scst.document_frequencies(config, workdir, references),
        references)
  else:
    train_step = cpu_tuning.compile_train_step(p_train_step)
  num_devices = jax.local_device_count()
  train_ds = source.train_dataset(vocab, seed=config.seed,
                                  skip_batches=start_step)
  train_iter = flax.jax_utils.prefetch_to_device(
      map(lambda b: input_pipeline.shard(b, num_devices),
          train_ds.as_numpy_iterator()), config.prefetch_batches)

  logging.info("Training %s for %d steps from step %d on %d devices.",
               config.dataset, config.num_train_steps, start_step,
               jax.device_count())
  last_time, last_step = time.time(), start_step
  saved_step = start_step
  for step in range(start_step, config.num_train_steps):
    state, train_metrics = train_step(state, next(train_iter), dropout_rng)
    done = step + 1
    last = done == config.num_train_steps
    log = done % config.log_every_steps == 0 or last
    evaluate_now = done % config.eval_every_steps == 0 or last
    save = done % config.checkpoint_every_steps == 0 or last
    if log or evaluate_now or save:
      train_metrics = {k: float(v) for k, v in
                       jax.device_get(train_metrics).items()}
      if not train_metrics.pop("finite"):
        raise errors.DivergedError(
            f"Training diverged at step {done} (loss "
            f"{train_metrics['loss']}); the newest checkpoint, of step "
            f"{saved_step}, is finite: lower --config.learning_rate (or "
            "--config.grad_clip_norm) and restart.")
    elif done % 50 == 0:
      # Bounded asynchronous dispatch: keeps fake-device collectives safe.
      jax.block_until_ready(train_metrics)
    if log:
      now = time.time()
      steps_per_sec = (done - last_step) / max(now - last_time, 1e-9)
      eta = (config.num_train_steps - done) / max(steps_per_sec, 1e-9)
      logging.info("step %d/%d: %s, %.2f steps a second, ETA %.0f s", done,
                   config.num_train_steps, evaluator.format_metrics(train_metrics),
                   steps_per_sec, eta)
      record = {"step": done, "split": "train", "steps_per_sec": steps_per_sec,
                "learning_rate": float(learning_rate(step)), **train_metrics}
      metrics_log.write(record)
      tensorboard.write(record)
      last_time, last_step = now, done
    if evaluate_now:
      shown = []
      eval_metrics = evaluator.evaluate(
          p_predict, state.params, state.batch_stats, source, config, vocab,
          config.eval_split, shown).metrics
      logging.info("eval %s at step %d: %s", config.eval_split, done,
                   evaluator.format_metrics(eval_metrics))
      record = {"step": done, "split": config.eval_split, **eval_metrics}
      metrics_log.write(record)
      tensorboard.write(record, shown)
      best_ckpt.save(done, state, vocab, config, metrics=eval_metrics,
                     info=source.run_info)
      last_time = time.time()
    if save:
      ckpt.save(done, state, vocab, config, info=source.run_info)
      saved_step = done

  test_metrics = evaluator.evaluate(
      p_predict, state.params, state.batch_stats, source, config, vocab,
      config.test_split).metrics
  logging.info("Final test evaluation (%s, step %d): %s", config.test_split,
               int(state.step), evaluator.format_metrics(test_metrics))
  record = {"step": int(state.step), "split": config.test_split,
            **test_metrics}
  metrics_log.write(record)
  tensorboard.write(record)
  tensorboard.close()
  return test_metrics
