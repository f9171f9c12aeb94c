"""The paper's stochastic "hard" attention in training (Xu et al., 4.1).

At every word the decoder reads one region, s_t ~ Multinoulli(alpha_t),
instead of the alpha-weighted mix. The sample is not differentiable, so the
model is trained on the variational bound L_s = sum_s p(s | a) log p(y | s, a)
with the paper's estimate of its gradient, for one sampled sequence s~:

  d log p(y | s~, a)                        (the words, through the context)
  + lambda_r (log p(y | s~, a) - b) d log p(s~ | a)   (REINFORCE on alpha)
  + lambda_e d H[s~]                        (entropy bonus on alpha)

with b a moving average of log p(y | s~, a) over training steps,
b <- decay b + (1 - decay) mean log p(y | s~, a), kept in the train state so
a resumed run continues exactly. With probability `sample_prob` an image
samples its regions; otherwise it reads the soft context at every word, as
the paper does "to further improve robustness" (its code's
`semi_sampling_p`).

Units: the words' cross-entropy is a mean per token over the global batch,
so the reward is a caption's mean log-likelihood per word (the paper's
code divides the summed cost by the batch's padded length), and the
REINFORCE and entropy sums are divided by the global token count N. The
paper's code (`capgen.py`, time-major [T, B, R]) averages the
cross-entropy over its batch B, (1 / B) sum_b sum_t xent_tb, but hands
Theano the gradient on alpha itself (`known_grads`), per (t, b, r) and not
divided by B:

  (c_bar - c_b) / 10 * (-s_tbr / alpha_tbr) + e (log alpha_tbr + 1),

with c_b the caption's mean cost per step, c_bar its moving average, s the
one-hot sample and e = `alpha_entropy_c` = 0.002. With r_b = -c_b and
b = -c_bar that is the gradient of

  0.1 sum_b -(r_b - b) log p(s~_b) - e sum_{t,b} H[alpha_tb].

Against the cross-entropy's weight 1 / B per word, REINFORCE weighs 0.1 per
caption and the entropy e per word: 0.1 B and e B relative to it. Here all
three sums are divided by N, so lambda_r and lambda_e are those ratios
themselves: lambda_r = 0.1 B and lambda_e = 0.002 B, both at the same
reference batch (`configs/default.py` says which). `known_grads` also
replaces the gradient that reaches alpha from the rest of the loss, so the
doubly stochastic penalty has no effect there; `config_checks` asks hard
runs for `alpha_c = 0`. Decoding reads the expected context as the code's
does, or the most likely region (`config.hard_attention.decoding`,
`fast_decoder.decode_step`).
"""

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from visionspeak_jax.models import attention


def draw_regions(rng: jax.Array, batch_size: int, length: int,
                 num_regions: int, sample_prob: float) -> attention.Regions:
  """The random choices of one training step on one device.

  Args:
    rng: this step's and device's key.
    batch_size: B, captions on this device.
    length: T, decoder steps.
    num_regions: R.
    sample_prob: probability that an image samples its regions (else it
      reads the soft context).

  Returns:
    `attention.Regions` with Gumbel noise [B, T, R] and `hard` [B].
  """
  k_noise, k_hard = jax.random.split(rng)
  return attention.Regions(
      gumbel=jax.random.gumbel(k_noise, (batch_size, length, num_regions)),
      hard=jax.random.bernoulli(k_hard, sample_prob,
                                (batch_size,)).astype(jnp.float32))


def loss_terms(logits: jax.Array, targets: jax.Array, mask: jax.Array,
               alphas: jax.Array, chosen: jax.Array,
               regions: attention.Regions, baseline: jax.Array,
               first_step: jax.Array, *, decay: float,
               axis_name: str = "batch") -> dict[str, jax.Array]:
  """Sums of the REINFORCE and entropy terms, and the next baseline.

  Args:
    logits: [B, T, V] of the teacher-forced unroll with `regions`.
    targets: [B, T] next words.
    mask: [B, T] 1.0 on real tokens.
    alphas: [B, T, R] attention weights.
    chosen: [B, T] the regions read (`teacher_forced`'s third output).
    regions: the step's `draw_regions`.
    baseline: the moving-average baseline before this step.
    first_step: True at a run's first step: the baseline starts at the
      batch's mean reward instead of 0 (rewards are about -log V there).
    decay: the baseline's moving-average decay.
    axis_name: the devices' axis; rewards average over all of them.

  Returns:
    `reinforce_sum` (sum over sampled captions of -(reward - b) log p(s~),
    log p(s~) summed over its words), `entropy_sum` (sum over tokens of
    H[alpha_t]), `reward` (mean reward of the sampled captions, all
    devices), `baseline` (the one used) and `new_baseline`.
  """
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  words = jnp.maximum(mask.sum(1), 1.0)
  reward = lax.stop_gradient(-(xent * mask).sum(1) / words)  # [B]
  hard = regions.hard * (mask.sum(1) > 0)
  sampled = lax.psum(hard.sum(), axis_name)  # Captions with a sample.
  mean_reward = (lax.psum((hard * reward).sum(), axis_name)
                 / jnp.maximum(sampled, 1.0))
  baseline = jnp.where(first_step, mean_reward, baseline)
  log_alphas = jnp.log(jnp.maximum(alphas, 1e-30))
  log_p_regions = (jnp.take_along_axis(log_alphas, chosen[..., None],
                                       -1)[..., 0] * mask).sum(1)  # [B]
  entropy = -(alphas * log_alphas).sum(-1)  # [B, T]
  return {
      "reinforce_sum": -(hard * (reward - baseline) * log_p_regions).sum(),
      "entropy_sum": (entropy * mask).sum(),
      "reward": mean_reward,
      "baseline": baseline,
      "new_baseline": update_baseline(baseline, mean_reward, sampled > 0,
                                      decay),
  }


def update_baseline(baseline: jax.Array, mean_reward: jax.Array,
                    any_sampled: jax.Array, decay: float) -> jax.Array:
  """b <- decay b + (1 - decay) mean reward; unchanged if nothing sampled."""
  return jnp.where(any_sampled, decay * baseline + (1.0 - decay) * mean_reward,
                   baseline)


def loss(terms: dict[str, jax.Array], tokens: jax.Array,
         config: ml_collections.ConfigDict) -> jax.Array:
  """The terms' share of the loss, normalised by the global token count.

  Args:
    terms: `loss_terms`' sums (totals over the devices, or this device's).
    tokens: the global token count N that divides the cross-entropy too
      (its per-device mean where `terms` are one device's).
    config: the run config; `hard_attention.reinforce_weight` and
      `entropy_weight` are the weights relative to the cross-entropy (see
      the module docstring for the reference code's equivalents).

  Returns:
    (lambda_r reinforce_sum - lambda_e entropy_sum) / N.
  """
  h = config.hard_attention
  return (h.reinforce_weight * terms["reinforce_sum"]
          - h.entropy_weight * terms["entropy_sum"]) / tokens
