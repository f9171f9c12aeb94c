"""Self-critical sequence training (SCST, Rennie et al. 2017).

After cross-entropy training, the decoder is trained on its own samples:
for each image K captions are sampled (temperature 1, no dropout), each is
rewarded with its CIDEr-D against the image's references, and the loss is

  -(reward - baseline) * sum_t log p(w_t)   (up to and including EOS)

averaged over the B x K samples, plus `config.scst.xe_weight` times the
cross-entropy of the batch's reference captions (a mixed objective: CIDEr
alone drifts towards its consensus phrasing, and on the shapes set that
phrasing binds colours to the wrong shapes more often). The baseline is the
mean reward of the image's other K - 1 samples ("mean", the default; no
extra decoding) or the reward of its greedy caption ("greedy", Rennie et
al.'s original).

One step is three parts:
1. on the devices (pmapped): the features, K samples per image (and the
   greedy captions for that baseline);
2. on the host: the rewards. CIDEr-D is a bag of n-gram dictionaries, a poor
   fit for an accelerator; on the host it is cheap for a batch
   (benchmarks/cider.py), each process scores its own images against every
   reference of each image (looked up by the batch's image ids, uncut) and
   the document frequencies of the whole training split, and the samples
   are small integer arrays;
3. on the devices (pmapped): the policy-gradient update. The samples'
   log-probabilities come from `fast_decoder.teacher_forced` on the samples
   as inputs, which gives exactly the log-probabilities the sampler drew
   them with (same parameters, no dropout), through the fast custom VJP.

The step is a function of (state, batch, base key) like the cross-entropy
step: samples draw with the key folded with the step and the device, and
the rewards are deterministic, so a resumed run continues exactly.
"""

import functools
import os
from typing import Any, Iterable, Sequence

from absl import logging
from etils import epath
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from visionspeak_jax.evaluation import cider
from visionspeak_jax.models import attention
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoding
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib

BASELINES = ("mean", "greedy")
OBJECTIVES = ("xe", "scst")

# A caption as CIDEr-D reads it: word ids (and EOS, see `words`).
Caption = tuple[int, ...]


def df_file(config: ml_collections.ConfigDict) -> str:
  """The file in WORKDIR that keeps the run's document frequencies."""
  return "cider_df_eos.npz" if config.scst.cider_eos else "cider_df.npz"


def cider_tokens(tokens: Iterable[int], *, eos: bool) -> Caption:
  """What CIDEr-D reads of a token row: the ids up to the first EOS.

  Args:
    tokens: a token row; BOS and PAD are dropped.
    eos: keep the EOS itself, as the last token (a row without one, cut by
      the length limit, ends without it).
  """
  out = []
  for t in tokens:
    t = int(t)
    if t == vocab_lib.EOS_ID:
      if eos:
        out.append(t)
      break
    if t not in (vocab_lib.PAD_ID, vocab_lib.BOS_ID):
      out.append(t)
  return tuple(out)


def training_references(references: Iterable[tuple[int, Sequence[str]]],
                        vocab: vocab_lib.Vocabulary, *, eos: bool
                        ) -> dict[int, list[Caption]]:
  """Every training image's references as CIDEr-D reads them, by image id.

  All of an image's references, each whole: the reference code
  (ruotianluo/self-critical.pytorch) scores against every caption of the
  image, and its document frequencies count the full captions.

  Args:
    references: (image id, reference captions) of each training image
      (`data.DataSource.references`).
    vocab: the run's vocabulary (the samples' tokens).
    eos: end every reference with EOS (`config.scst.cider_eos`).

  Returns:
    image id -> its references; an image whose references have no words
    keeps one empty reference (every sample then scores 0).
  """
  end = (vocab_lib.EOS_ID,) if eos else ()
  out = {}
  for image_id, texts in references:
    refs = [tuple(ids) + end for ids in map(vocab.encode, texts) if ids]
    out[int(image_id)] = refs or [()]
  return out


def document_frequencies(config: ml_collections.ConfigDict, workdir: str,
                         references: dict[int, list[Caption]]
                         ) -> cider.DocumentFrequencies:
  """The run's CIDEr-D document frequencies: loaded, or built and saved.

  Built once from the training split's references (`training_references`)
  and kept in WORKDIR, so a resumed run scores with the same statistics.

  Args:
    config: the run config.
    workdir: the run's directory.
    references: `training_references` of the training split.
  """
  path = os.path.join(workdir, df_file(config))
  if epath.Path(path).exists():
    return cider.DocumentFrequencies.load(path)
  df = cider.DocumentFrequencies.build(list(references.values()))
  if jax.process_index() == 0:
    df.save(path)
  logging.info("CIDEr-D document frequencies of %d training images.",
               df.num_images)
  return df


def sequence_mask(samples: jax.Array) -> jax.Array:
  """1.0 on a sample's words up to and including its first EOS, else 0.0.

  Not `samples != PAD`: a sampler may draw any word, PAD and BOS included,
  before its EOS, and those draws count in the sample's probability.
  """
  is_eos = samples == vocab_lib.EOS_ID
  return (jnp.cumsum(is_eos, axis=1) - is_eos == 0).astype(jnp.float32)


def _per_device_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(rng, step),
                            lax.axis_index("batch"))


def sample_step(params: Any, batch_stats: Any, inputs: dict[str, jax.Array],
                step: jax.Array, rng: jax.Array, *,
                config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """K sampled captions per image (and the greedy one), on one device.

  Returns:
    `samples` int32 [b * K, L] (row i * K + k: image i), PAD after EOS; with
    the greedy baseline also `greedy` int32 [b, L].
  """
  k = config.scst.num_samples
  feats, _ = captioner.encode(captioner.create_encoder(config), params,
                              batch_stats, inputs, train=False,
                              grid_hw=captioner.grid(config))
  weights = fast_decoder.decoding_weights(params["decoder"],
                                          captioner.compute_dtype(config),
                                          captioner.decoding_attention(config))
  step_fn, start = captioner.make_step_fn(weights, feats)
  b = feats.shape[0]
  ids = dict(bos_id=vocab_lib.BOS_ID, eos_id=vocab_lib.EOS_ID,
             pad_id=vocab_lib.PAD_ID)
  samples = decoding.sample(
      step_fn, jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), start),
      b * k, config.max_decode_length, _per_device_key(rng, step), **ids)
  out = {"samples": samples.tokens}
  if config.scst.baseline == "greedy":
    out["greedy"] = decoding.greedy(step_fn, start, b,
                                    config.max_decode_length, **ids).tokens
  return out


def update_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *,
                config: ml_collections.ConfigDict
                ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """The policy-gradient update on this device's samples.

  Args:
    state: the train state.
    batch: the model input (`image` or `features`) [b, ...], `tokens`
      int32 [b, T + 1] (a reference caption each), `samples` int32 [b * K, L]
      and `advantages` float32 [b * K] (reward - baseline).
    config: the run config.

  Returns:
    (new state, metrics averaged over devices).
  """
  k = config.scst.num_samples
  encoder = captioner.create_encoder(config, axis_name="batch")
  samples = batch["samples"]
  tokens_in = jnp.concatenate(
      [jnp.full_like(samples[:, :1], vocab_lib.BOS_ID), samples[:, :-1]], 1)
  mask = sequence_mask(samples)
  ref_in, ref_targets, ref_mask = step_lib.split_tokens(batch["tokens"])
  ref_tokens = jnp.maximum(lax.pmean(ref_mask.sum(), "batch"), 1.0)
  dtype = captioner.compute_dtype(config)

  def loss_fn(params, train_encoder):
    feats, batch_stats = captioner.encode(encoder, params, state.batch_stats,
                                          batch, train=train_encoder,
                                          grid_hw=captioner.grid(config))
    logits, _, _ = fast_decoder.teacher_forced(
        params["decoder"], jnp.repeat(feats, k, axis=0), tokens_in,
        dtype=dtype, regions=_decoding_regions(config, samples.shape[0],
                                               feats.shape[1], tokens_in))
    # [b * K, L, V]
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                   samples[..., None], -1)[..., 0]
    sequence = (logprobs * mask).sum(1)  # [b * K]
    # Every device has b * K samples: the pmean of these means is the
    # gradient of the global mean.
    loss = -(batch["advantages"] * sequence).mean()
    xent = jnp.zeros(())
    if config.scst.xe_weight:
      ref_logits, _, _ = fast_decoder.teacher_forced(
          params["decoder"], feats, ref_in, dtype=dtype,
          regions=_decoding_regions(config, feats.shape[0], feats.shape[1],
                                    ref_in))
      xent = (optax.softmax_cross_entropy_with_integer_labels(
          ref_logits, ref_targets) * ref_mask).sum() / ref_tokens
      loss = loss + config.scst.xe_weight * xent
    return loss, (batch_stats, (sequence, xent))

  state, grads, (sequence, xent) = step_lib.gradient_update(state, config,
                                                            loss_fn)
  metrics = lax.pmean({
      "loss": (-(batch["advantages"] * sequence).mean()
               + config.scst.xe_weight * xent),
      "xent": xent,
      "sample_logprob": sequence.mean(),
      "sample_length": mask.sum(1).mean(),
  }, "batch")
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["finite"] = step_lib.is_finite(metrics["loss"], state)
  return state, metrics


def _decoding_regions(config: ml_collections.ConfigDict, rows: int,
                      num_regions: int, tokens_in: jax.Array
                      ) -> attention.Regions | None:
  """The regions the sampler read: hard attention's most likely ones."""
  if captioner.decoding_attention(config) != "hard":
    return None
  return attention.Regions(
      gumbel=jnp.zeros((rows, tokens_in.shape[1], num_regions)),
      hard=jnp.ones((rows,)))


def advantages(rewards: np.ndarray, baseline: np.ndarray | None = None
               ) -> np.ndarray:
  """reward - baseline for [B, K] rewards.

  Args:
    rewards: [B, K], the K samples of each image.
    baseline: [B] rewards of the greedy captions, or None for the mean of
      each sample's K - 1 siblings.
  """
  if baseline is not None:
    return rewards - baseline[:, None]
  k = rewards.shape[1]
  others = (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
  return rewards - others


class SelfCriticalStep:
  """`step.compile_steps`'s train step for `config.objective == "scst"`.

  Called as the cross-entropy step is, `(state, batch, rng) -> (state,
  metrics)`, with device-sharded batches that also hold `image_id`
  [devices, b] (see `input_pipeline.sample_captions`): the rewards score
  against the references of those images.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               df: cider.DocumentFrequencies,
               references: dict[int, list[Caption]],
               devices: list[jax.Device] | None = None):
    """The step.

    Args:
      config: the run config.
      df: the training split's document frequencies
        (`document_frequencies`).
      references: `training_references` of the training split.
      devices: the devices to run on (default: all local ones).
    """
    self.config = config
    self.scorer = cider.CiderD(df)
    self.references = references
    self.p_sample = jax.pmap(
        functools.partial(sample_step, config=config), axis_name="batch",
        in_axes=(None, None, 0, None, None), devices=devices)
    self.p_update = jax.pmap(
        functools.partial(update_step, config=config), axis_name="batch",
        in_axes=(None, 0), out_axes=(None, None),
        donate_argnums=(0,) if jax.process_count() == 1 else (),
        devices=devices)

  def rewards(self, candidates: np.ndarray, image_ids: np.ndarray
              ) -> np.ndarray:
    """CIDEr-D of [n * K, L] candidates (K per image) of n images' ids."""
    k = len(candidates) // len(image_ids)
    refs = [self.references[int(i)] for i in image_ids]
    eos = self.config.scst.cider_eos
    return self.scorer.score([cider_tokens(c, eos=eos) for c in candidates],
                             refs, np.repeat(np.arange(len(refs)), k))

  def __call__(self, state: state_lib.TrainState, batch: dict[str, Any],
               rng: jax.Array
               ) -> tuple[state_lib.TrainState, dict[str, Any]]:
    k = self.config.scst.num_samples
    inputs = {key: v for key, v in batch.items()
              if key in ("image", "features")}
    out = self.p_sample(state.params, state.batch_stats, inputs, state.step,
                        rng)
    samples = np.asarray(out["samples"])  # [D, b * K, L]
    image_ids = np.asarray(batch["image_id"]).reshape(-1)  # [D * b]
    rewards = self.rewards(samples.reshape(image_ids.size * k, -1),
                           image_ids).reshape(image_ids.size, k)
    greedy = None
    if "greedy" in out:
      greedy = self.rewards(
          np.asarray(out["greedy"]).reshape(image_ids.size, -1), image_ids)
    adv = advantages(rewards, greedy).astype(np.float32)
    state, metrics = self.p_update(
        state, {**inputs, "tokens": batch["tokens"], "samples": out["samples"],
                "advantages": adv.reshape(samples.shape[:2])})
    metrics = dict(metrics, reward=float(rewards.mean()))
    if greedy is not None:
      metrics["greedy_reward"] = float(greedy.mean())
    return state, metrics
