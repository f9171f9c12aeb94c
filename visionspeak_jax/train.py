"""Training and evaluation of the captioner.

`train_step` and `eval_step` are per-device functions that name their
collectives over the `batch` axis; `train_and_evaluate` compiles them with
`jax.pmap`, keeps the state unreplicated (`in_axes=None`, `out_axes=None`)
and runs the loop: train, log, evaluate, checkpoint, resume.

`config.encoder_mode` picks what is trained:
  "end_to_end": the ResNet and the decoder from images, one learning rate.
  "cached": the decoder alone, on features from a cache written by
    `extract_features` (params `{"decoder": ...}`; the ResNet never runs).
  "fine_tune": both from images, the encoder on its own learning rate
    (`config.encoder_learning_rate`; 0 freezes it), usually starting from
    imported weights (`config.model.pretrained_path`) and/or an earlier run
    (`config.init_from`).
"""

import functools
import json
import os
import time
from typing import Any

from absl import logging
import flax
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from visionspeak_jax import checkpoint as checkpoint_lib
from visionspeak_jax import decoder
from visionspeak_jax import features as features_lib
from visionspeak_jax import input_pipeline
from visionspeak_jax import metrics as metrics_lib
from visionspeak_jax import model
from visionspeak_jax import pretrained
from visionspeak_jax import vocabulary as vocab_lib


ENCODER_MODES = ("end_to_end", "cached", "fine_tune")


class TrainState(train_state.TrainState):
  batch_stats: Any


def encoder_mode(config: ml_collections.ConfigDict) -> str:
  """`config.encoder_mode`, checked."""
  mode = config.get("encoder_mode", "end_to_end")
  if mode not in ENCODER_MODES:
    raise ValueError(f"Unknown encoder_mode {mode!r}: set "
                     f"--config.encoder_mode to one of "
                     f"{', '.join(ENCODER_MODES)}.")
  return mode


def _encoder_frozen(config: ml_collections.ConfigDict) -> bool:
  """Fine-tuning with encoder_learning_rate 0: the ResNet only infers."""
  return (encoder_mode(config) == "fine_tune" and
          config.encoder_learning_rate <= 0)


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            peak: float | None = None) -> optax.Schedule:
  """Linear warm-up to `peak` (`learning_rate`), then cosine decay to zero."""
  warmup = min(config.warmup_steps, config.num_train_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate if peak is None else peak,
      warmup_steps=warmup,
      decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
  """AdamW on the learning-rate schedule, after global-norm clipping.

  In "fine_tune" mode the `encoder` and `decoder` subtrees get their own
  AdamW (peaks `encoder_learning_rate` and `learning_rate`); an encoder rate
  of 0 leaves the encoder untouched.
  """
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  tx = optax.adamw(create_learning_rate_fn(config),
                   weight_decay=config.weight_decay)
  if encoder_mode(config) == "fine_tune":
    if config.encoder_learning_rate > 0:
      encoder_tx = optax.adamw(
          create_learning_rate_fn(config, config.encoder_learning_rate),
          weight_decay=config.weight_decay)
    else:
      encoder_tx = optax.set_to_zero()
    tx = optax.multi_transform(
        {"encoder": encoder_tx, "decoder": tx},
        lambda params: {k: jax.tree.map(lambda _, k=k: k, v)
                        for k, v in params.items()})
  parts.append(tx)
  return optax.chain(*parts)


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict,
                       vocab_size: int) -> TrainState:
  """Fresh parameters, BatchNorm statistics and optimizer state.

  In "cached" mode the parameters are `{"decoder": ...}` alone and
  `batch_stats` is empty: the features come precomputed.
  """
  if encoder_mode(config) == "cached":
    _, k_dec = jax.random.split(rng)  # The decoder key of `model.init`.
    params = {"decoder": model.init_decoder(k_dec, config, vocab_size,
                                            model.num_regions(config))}
    batch_stats, apply_fn = {}, None
  else:
    params, batch_stats = model.init(rng, config, vocab_size)
    apply_fn = model.create_encoder(config).apply
  state = TrainState.create(apply_fn=apply_fn, params=params,
                            tx=create_optimizer(config),
                            batch_stats=batch_stats)
  # An array step from the start: a Python int here would make the second
  # call of the compiled step see a new signature and compile again.
  return state.replace(step=jnp.zeros((), jnp.int32))


def split_tokens(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, T + 1] padded captions -> inputs [B, T], targets [B, T], mask [B, T]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  return inputs, targets, (targets != vocab_lib.PAD_ID).astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, *, config: ml_collections.ConfigDict
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the global batch.

  The loss is normalised by the mean number of tokens (and captions) per
  device, so that `pmean` of the per-device gradients is exactly the gradient
  of the global-batch loss, whatever the device count.

  Args:
    state: the train state (same on every device).
    batch: `image` uint8 [b, S, S, 3] (or, in "cached" mode, `features`
      float16 [b, R, C]) and `tokens` int32 [b, T + 1].
    rng: the run's base key; the step and device are folded in here.
    config: the run config.

  Returns:
    (new state, metrics summed over devices).
  """
  encoder = model.create_encoder(config, axis_name="batch")
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                           lax.axis_index("batch"))
  inputs, targets, mask = split_tokens(batch["tokens"])
  mode = encoder_mode(config)
  frozen = _encoder_frozen(config)
  if mode == "cached":
    fixed_features = batch["features"].astype(jnp.float32)  # [b, R, C]
  elif frozen:
    # A frozen encoder infers (running BatchNorm statistics) outside the
    # differentiated function: no backward pass through the ResNet.
    fixed_features, _ = model.encode(encoder, state.params, state.batch_stats,
                                     batch["image"], train=False)

  def loss_fn(params):
    if mode == "cached" or frozen:
      features, batch_stats = fixed_features, state.batch_stats
    else:
      features, batch_stats = model.encode(encoder, params, state.batch_stats,
                                           batch["image"], train=True)
    logits, alphas = decoder.teacher_forced(
        params["decoder"], features, inputs,
        dropout_rate=config.model.dropout_rate, rng=rng)
    terms = decoder.loss_terms(logits, targets, mask, alphas)
    tokens = jnp.maximum(lax.pmean(terms["tokens"], "batch"), 1.0)
    captions = jnp.maximum(lax.pmean(terms["captions"], "batch"), 1.0)
    loss = (terms["xent_sum"] / tokens
            + config.alpha_c * terms["attention_sum"] / captions)
    return loss, (terms, batch_stats)

  # Differentiate per-device copies of the parameters: the gradients stay
  # local until the one explicit pmean, instead of JAX summing them across
  # devices implicitly at every use of the parameters inside the scans.
  if frozen:
    # Only the decoder is differentiated and averaged; the encoder's zero
    # gradients stay local (optax.set_to_zero ignores them anyway).
    params = lax.pcast({"decoder": state.params["decoder"]}, "batch",
                       to="varying")
    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    grads = {"encoder": jax.tree.map(jnp.zeros_like, state.params["encoder"]),
             "decoder": lax.pmean(grads["decoder"], "batch")}
  else:
    params = lax.pcast(state.params, "batch", to="varying")
    grads, (terms, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    grads = lax.pmean(grads, "batch")
  # Synchronised BatchNorm already made the statistics equal across devices.
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  totals = lax.psum(terms, "batch")
  tokens = jnp.maximum(totals["tokens"], 1.0)
  captions = jnp.maximum(totals["captions"], 1.0)
  metrics = {
      "xent": totals["xent_sum"] / tokens,
      "attention_loss": totals["attention_sum"] / captions,
      "accuracy": totals["correct"] / tokens,
      "grad_norm": optax.tree.norm(grads),
  }
  metrics["loss"] = metrics["xent"] + config.alpha_c * metrics["attention_loss"]
  return state, metrics


def eval_step(state: TrainState, weights: Any, images: jax.Array, *,
              config: ml_collections.ConfigDict):
  """Beam-search captions (and attention maps) for this device's images.

  `weights` are `model.decoding_weights` of the state's decoder, built once
  per evaluation pass. `images` are uint8 [b, S, S, 3], or in "cached" mode
  features [b, R, C].
  """
  if encoder_mode(config) == "cached":
    features = images.astype(jnp.float32)
  else:
    encoder = model.create_encoder(config)
    features, _ = model.encode(encoder, state.params, state.batch_stats,
                               images, train=False)
  return model.beam_caption(weights, features,
                            beam_size=config.beam_size,
                            max_length=config.max_decode_length,
                            length_penalty=config.length_penalty)


def compile_steps(config: ml_collections.ConfigDict,
                  devices: list[jax.Device] | None = None):
  """The pmapped train and eval steps; the state is never replicated.

  Args:
    config: the run config.
    devices: the local devices to map over (default: all).

  Returns:
    (p_train_step, p_eval_step).
  """
  p_train_step = jax.pmap(
      functools.partial(train_step, config=config), axis_name="batch",
      in_axes=(None, 0, None), out_axes=(None, None),
      donate_argnums=(0,) if jax.process_count() == 1 else (),
      devices=devices)
  p_eval_step = jax.pmap(functools.partial(eval_step, config=config),
                         axis_name="batch", in_axes=(None, None, 0),
                         out_axes=0, devices=devices)
  return p_train_step, p_eval_step


def evaluate(p_eval_step, state: TrainState, builder, config, vocab, split: str,
             cache: features_lib.FeatureCache | None = None
             ) -> dict[str, float]:
  """Captions a split with beam search and scores it.

  With a feature `cache` ("cached" mode) the split is read from it and
  `builder` is unused.

  Returns:
    Caption metrics (BLEU-1..4, METEOR when Java is present, ROUGE-L, CIDEr)
    and, for datasets with object annotations, content F1 and attention
    grounding.
  """
  num_devices = input_pipeline.eval_devices(config)
  references, predictions = {}, {}
  words, alphas, objects = [], [], []
  if cache is not None:
    examples = cache.eval_examples(split, config.num_eval_examples)
  else:
    examples = input_pipeline.eval_examples(builder, split, config.image_size,
                                            config.num_eval_examples)
  # Once for the whole split.
  weights = model.decoding_weights(state.params["decoder"],
                                   config.decode_dtype)
  for images, batch in input_pipeline.batch_eval_examples(
      examples, config.eval_batch_size):
    decoded = p_eval_step(state, weights,
                          input_pipeline.shard(images, num_devices))
    tokens = np.asarray(decoded.tokens).reshape(len(images), -1)  # [B, L]
    batch_alphas = np.asarray(decoded.alphas)
    batch_alphas = batch_alphas.reshape((len(images),) +
                                        batch_alphas.shape[2:])  # [B, L, R]
    for i, ex in enumerate(batch):
      caption, positions = vocab.decode_with_positions(tokens[i])
      references[ex.image_id] = ex.references
      predictions[ex.image_id] = " ".join(caption)
      words.append(caption)
      alphas.append(batch_alphas[i, positions])  # [len(caption), R]
      objects.append(ex.objects)
  for image_id in list(predictions)[:3]:
    logging.info("  %s: %r (reference: %r)", image_id, predictions[image_id],
                 references[image_id][0])
  results = metrics_lib.caption_metrics(references, predictions,
                                        use_java=config.metrics_use_java)
  if any(objects):
    results.update(metrics_lib.content_f1(
        [" ".join(w) for w in words],
        [[(o["color"], o["shape"]) for o in objs] for objs in objects]))
    grid = int(round(np.sqrt(alphas[0].shape[-1])))
    results["grounding"] = metrics_lib.attention_grounding(
        words, alphas, objects, (grid, grid))
  results["num_images"] = len(predictions)
  return results


def _init_checkpoint(config: ml_collections.ConfigDict
                     ) -> checkpoint_lib.Checkpointer:
  directory = os.path.join(config.init_from, "checkpoints")
  if not os.path.isdir(directory):
    raise checkpoint_lib.CheckpointError(
        f"No checkpoint in {directory}: point --config.init_from at a "
        "finished run's workdir.")
  return checkpoint_lib.Checkpointer(directory)


def init_from_checkpoint(state: TrainState, config: ml_collections.ConfigDict
                         ) -> TrainState:
  """Copies the parameters of `config.init_from`'s latest checkpoint.

  Each of the `encoder` (with its BatchNorm statistics) and `decoder`
  subtrees that the earlier run has and this state has is copied; the rest,
  the step and the optimizer state stay fresh. A "cached" run thus gives its
  decoder to a "fine_tune" run whose encoder comes from pretrained weights.

  Raises:
    checkpoint.CheckpointError: no checkpoint there, or its shapes differ.
  """
  ckpt = _init_checkpoint(config)
  try:
    step = ckpt.latest_step()
    vocab, saved = ckpt.restore_metadata(step)
    target = jax.eval_shape(lambda: create_train_state(
        jax.random.key(0), saved, len(vocab)))
    source = ckpt.restore_state(target, step)
  finally:
    ckpt.close()
  params = dict(state.params)
  batch_stats = state.batch_stats
  copied = []
  for part in ("encoder", "decoder"):
    if part in params and part in source.params:
      mine = jax.tree.map(lambda x: (x.shape, x.dtype), params[part])
      theirs = jax.tree.map(lambda x: (x.shape, x.dtype), source.params[part])
      if mine != theirs:
        raise checkpoint_lib.CheckpointError(
            f"The {part} in {config.init_from} (step {step}) has other "
            f"shapes than this config's: use the same --config.model "
            f"settings as that run.")
      params[part] = source.params[part]
      if part == "encoder":
        batch_stats = source.batch_stats
      copied.append(part)
  logging.info("Initialised %s from %s (step %d).",
               " and ".join(copied) or "nothing", config.init_from, step)
  if "encoder" in params and "encoder" not in copied:
    params, batch_stats = _extraction_encoder(config, saved, params,
                                              batch_stats)
  return state.replace(params=params, batch_stats=batch_stats)


def _extraction_encoder(config: ml_collections.ConfigDict,
                        saved: ml_collections.ConfigDict, params: Any,
                        batch_stats: Any) -> tuple[Any, Any]:
  """The encoder for a decoder taken over from a "cached" run.

  That decoder learnt on the features of one frozen encoder, recorded by
  fingerprint in the run's feature cache. With
  `config.model.pretrained_path` the loaded weights must be that encoder;
  without it, that encoder is rebuilt from the cache's record.

  Raises:
    checkpoint.CheckpointError: the pretrained weights are another encoder.
    features.FeatureCacheError: the recorded encoder cannot be rebuilt.
  """
  index = features_lib.cache_index(saved, config.init_from)
  pretrained_path = config.model.get("pretrained_path", "")
  if index is None:
    logging.warning(
        "The feature cache of %s is gone, so its encoder is unknown: the "
        "encoder starts from %s.", config.init_from,
        pretrained_path or "a random init")
    return params, batch_stats
  if pretrained_path:
    mine = pretrained.fingerprint({"params": params["encoder"],
                                   "batch_stats": batch_stats})
    if mine != index["encoder_fingerprint"]:
      raise checkpoint_lib.CheckpointError(
          f"The encoder weights in {pretrained_path} (fingerprint {mine}) are "
          f"not the ones the decoder of {config.init_from} learnt from "
          f"({index['encoder_source']}, fingerprint "
          f"{index['encoder_fingerprint']}): pass those weights, or drop "
          "--config.model.pretrained_path to rebuild them.")
    return params, batch_stats
  variables = features_lib.extraction_encoder(saved, config.init_from, index)
  logging.info("The encoder starts from %s, which extracted the features "
               "the decoder of %s learnt from.", index["encoder_source"],
               config.init_from)
  return dict(params, encoder=variables["params"]), variables["batch_stats"]


def _format(metrics: dict[str, Any]) -> str:
  return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in sorted(metrics.items()))


def _write_metrics(workdir: str, record: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains, evaluates and checkpoints; resumes from the latest checkpoint.

  Args:
    config: the run config.
    workdir: where checkpoints, the vocabulary and metrics.jsonl go.

  Returns:
    The final metrics on `config.test_split`.
  """
  os.makedirs(workdir, exist_ok=True)
  num_devices = jax.local_device_count()
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} must be divisible by "
                     f"the {jax.device_count()} devices.")
  cached = encoder_mode(config) == "cached"
  # A bad name stops the run here, not at its first evaluation.
  model.decode_dtype(config.decode_dtype)
  if cached:
    # Features, captions and objects all come from the cache: no TFDS.
    cache = features_lib.open_cache(config, workdir)
    builder = None
    logging.info("Training the decoder on cached features from %s (encoder "
                 "%s).", cache.directory, cache.index["encoder_source"])
  else:
    cache = None
    builder = input_pipeline.get_builder(config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     config.max_checkpoints_to_keep)
  best_ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "best"), 1,
                                          best_metric=config.best_metric)
  latest = ckpt.latest_step()
  if latest is not None:
    vocab, _ = ckpt.restore_metadata(latest)
    logging.info("Resuming from the checkpoint of step %d.", latest)
  elif config.get("init_from", ""):
    # The decoder copied from that run speaks its vocabulary.
    init_ckpt = _init_checkpoint(config)
    vocab, _ = init_ckpt.restore_metadata()
    init_ckpt.close()
  elif cached:
    vocab = vocab_lib.Vocabulary.build(cache.captions(config.train_split),
                                       min_count=config.vocab_min_count)
  else:
    vocab = input_pipeline.build_vocabulary(builder, config.train_split,
                                            config.vocab_min_count)
  if latest is None and jax.process_index() == 0:
    vocab.save(os.path.join(workdir, "vocab.json"))
  logging.info("Vocabulary: %d words.", len(vocab))

  rng = jax.random.key(config.seed)
  state = create_train_state(jax.random.fold_in(rng, 0), config, len(vocab))
  if latest is not None:
    state = ckpt.restore_state(state, latest)
  elif config.get("init_from", ""):
    state = init_from_checkpoint(state, config)
  start_step = int(state.step)
  dropout_rng = jax.random.fold_in(rng, 1)
  p_train_step, p_eval_step = compile_steps(config)

  # A resumed run reads a fresh data order rather than replaying the start.
  if cached:
    train_ds = cache.train_dataset(config, vocab, seed=config.seed + start_step)
  else:
    train_ds = input_pipeline.create_train_dataset(
        builder, config, vocab, seed=config.seed + start_step)
  train_iter = flax.jax_utils.prefetch_to_device(
      map(lambda b: input_pipeline.shard(b, num_devices),
          train_ds.as_numpy_iterator()), config.prefetch_batches)

  logging.info("Training %s for %d steps from step %d on %d devices.",
               config.dataset, config.num_train_steps, start_step,
               jax.device_count())
  last_time, last_step = time.time(), start_step
  for step in range(start_step, config.num_train_steps):
    state, train_metrics = p_train_step(state, next(train_iter), dropout_rng)
    done = step + 1
    if done % config.log_every_steps == 0 or done == config.num_train_steps:
      train_metrics = {k: float(v) for k, v in
                       jax.device_get(train_metrics).items()}
      if not np.isfinite(train_metrics["loss"]):
        raise FloatingPointError(
            f"Training diverged at step {done} (loss "
            f"{train_metrics['loss']}): lower --config.learning_rate or "
            "--config.grad_clip_norm and restart.")
      now = time.time()
      steps_per_sec = (done - last_step) / max(now - last_time, 1e-9)
      eta = (config.num_train_steps - done) / max(steps_per_sec, 1e-9)
      logging.info("step %d/%d: %s, %.2f steps/s, ETA %.0f s", done,
                   config.num_train_steps, _format(train_metrics),
                   steps_per_sec, eta)
      _write_metrics(workdir, {"step": done, "split": "train",
                               "steps_per_sec": steps_per_sec,
                               **train_metrics})
      last_time, last_step = now, done
    elif done % 50 == 0:
      # Bounded asynchronous dispatch: keeps fake-device collectives safe.
      jax.block_until_ready(train_metrics)
    if (done % config.eval_every_steps == 0 or
        done == config.num_train_steps):
      eval_metrics = evaluate(p_eval_step, state, builder, config, vocab,
                              config.eval_split, cache)
      logging.info("eval %s at step %d: %s", config.eval_split, done,
                   _format(eval_metrics))
      _write_metrics(workdir, {"step": done, "split": config.eval_split,
                               **eval_metrics})
      best_ckpt.save(done, state, vocab, config, metrics=eval_metrics)
      last_time = time.time()
    if (done % config.checkpoint_every_steps == 0 or
        done == config.num_train_steps):
      ckpt.save(done, state, vocab, config)
  for c in (ckpt, best_ckpt):
    c.wait()
    c.close()

  test_metrics = evaluate(p_eval_step, state, builder, config, vocab,
                          config.test_split, cache)
  logging.info("Final test evaluation (%s, step %d): %s", config.test_split,
               int(state.step), _format(test_metrics))
  _write_metrics(workdir, {"step": int(state.step),
                           "split": config.test_split, **test_metrics})
  return test_metrics
