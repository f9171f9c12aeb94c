"""The paper's stochastic hard attention: sampling, its REINFORCE estimate,
the train step, exact resume, and decoding with the expected context (the
default, as the authors' code) or one region per word."""

import os
import shutil

from batches import fake_batch
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax import train
from visionspeak_jax.models import attention
from visionspeak_jax.models import captioner
from visionspeak_jax.models import decoder
from visionspeak_jax.models import fast_decoder
from visionspeak_jax.models import resnet
from visionspeak_jax.run import config_checks
from visionspeak_jax.run import restore
from visionspeak_jax.tools import evaluate
from visionspeak_jax.training import hard_attention
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib


def _decoder(vocab=9, regions=5):
  return decoder.init(jax.random.key(0), vocab_size=vocab, feature_dim=6,
                      embed_dim=5, hidden_dim=7, attention_dim=4,
                      num_regions=regions)


def test_gumbel_choice_samples_alpha_and_zero_noise_takes_the_mode():
  n, r = 40_000, 5
  params = attention.init(jax.random.key(1), 6, 7, 4)
  features = jax.random.normal(jax.random.key(2), (1, r, 6))
  proj = attention.project_features(params, features)
  query = jnp.repeat(jax.random.normal(jax.random.key(3), (1, 7)) @
                     params["w_h"], n, axis=0)
  regions = attention.Regions(jax.random.gumbel(jax.random.key(4), (n, r)),
                              jnp.ones((n,)))
  # One image, n hypotheses (the beam layout): every row reads the image.
  context, alpha, chosen = attention.attend_query(params, features, proj,
                                                  query, regions)
  frequencies = np.bincount(np.asarray(chosen), minlength=r) / n
  np.testing.assert_allclose(frequencies, alpha[0], atol=0.01)
  # Each row read exactly its chosen region's features.
  np.testing.assert_allclose(context, features[0][np.asarray(chosen)],
                             rtol=1e-6)
  _, _, mode = attention.attend_query(
      params, features, proj, query[:3],
      attention.Regions(jnp.zeros((3, r)), jnp.ones((3,))))
  np.testing.assert_array_equal(mode, np.argmax(alpha[0]))
  # hard = 0 reads the soft context.
  soft, _, _ = attention.attend_query(
      params, features, proj, query[:2],
      attention.Regions(jnp.zeros((2, r)), jnp.zeros((2,))))
  np.testing.assert_allclose(soft[0], alpha[0] @ features[0], rtol=1e-5)


def _terms(first_step, baseline=-1.0):
  rng = np.random.RandomState(0)
  b, t, v, r = 3, 4, 6, 5
  logits = rng.randn(b, t, v).astype(np.float32)
  targets = rng.randint(0, v, (b, t))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
  alphas = jax.nn.softmax(rng.randn(b, t, r).astype(np.float32), -1)
  chosen = rng.randint(0, r, (b, t)).astype(np.int32)
  regions = attention.Regions(jnp.zeros((b, t, r)),
                              jnp.array([1.0, 0.0, 1.0]))
  # One device: vmap over a leading axis of 1 names the psum's axis.
  terms = jax.vmap(
      lambda *a: hard_attention.loss_terms(
          *a, regions, jnp.float32(baseline), first_step, decay=0.9),
      axis_name="batch")(*(x[None] for x in (logits, targets, mask, alphas,
                                             chosen)))
  terms = {k: np.asarray(x[0]) for k, x in terms.items()}
  logp = np.asarray(jax.nn.log_softmax(logits))
  reward = np.array([logp[i, np.arange(t), targets[i]] @ mask[i]
                     / mask[i].sum() for i in range(b)])
  log_p_regions = np.array([
      np.log(alphas[i, np.arange(t), chosen[i]]) @ mask[i] for i in range(b)])
  entropy = -(alphas * np.log(alphas)).sum(-1)
  return terms, reward, log_p_regions, entropy, mask


def test_loss_terms_by_hand():
  terms, reward, log_p, entropy, mask = _terms(first_step=False)
  sampled = [0, 2]  # Caption 1 read the soft context: no REINFORCE term.
  mean = reward[sampled].mean()
  np.testing.assert_allclose(terms["reward"], mean, rtol=1e-5)
  np.testing.assert_allclose(terms["baseline"], -1.0)
  np.testing.assert_allclose(
      terms["reinforce_sum"],
      -sum((reward[i] + 1.0) * log_p[i] for i in sampled), rtol=1e-5)
  np.testing.assert_allclose(terms["entropy_sum"], (entropy * mask).sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(terms["new_baseline"], 0.9 * -1.0 + 0.1 * mean,
                             rtol=1e-5)
  # A run's first step starts the baseline at the batch's mean reward.
  first, *_ = _terms(first_step=True)
  np.testing.assert_allclose(first["baseline"], mean, rtol=1e-5)
  np.testing.assert_allclose(first["new_baseline"], mean, rtol=1e-5)


@pytest.mark.slow
def test_reinforce_estimates_the_gradient_of_the_expected_log_likelihood():
  """Over many samples, the hard loss's gradient on the attention scores
  (`v`, which changes nothing but alpha) is -d/dv sum_s alpha_s log p(y|s)."""
  n, r = 20_000, 5
  params = _decoder(regions=r)
  features = jax.random.normal(jax.random.key(5), (1, r, 6))
  tokens_in = jnp.full((n, 1), 1, jnp.int32)
  targets = jnp.full((n, 1), 4, jnp.int32)
  mask = jnp.ones((n, 1))
  config = tiny.get_config()
  config.hard_attention.reinforce_weight = 1.0
  config.hard_attention.entropy_weight = 0.0
  regions = hard_attention.draw_regions(jax.random.key(6), n, 1, r, 1.0)

  def hard_loss(v):
    p = {**params, "attention": {**params["attention"], "v": v}}
    feats = jnp.repeat(features, n, axis=0)
    logits, alphas, chosen = fast_decoder.teacher_forced(
        p, feats, tokens_in, regions=regions)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    terms = hard_attention.loss_terms(logits, targets, mask, alphas, chosen,
                                      regions, jnp.float32(0.0), True,
                                      decay=0.9)
    return xent.mean() + hard_attention.loss(terms, jnp.float32(n), config)

  estimate = jax.grad(
      lambda v: jax.vmap(hard_loss, axis_name="batch")(v[None])[0])(
          params["attention"]["v"])

  def reward(s):  # log p(y | region s), by forcing the choice.
    forced = attention.Regions(
        jnp.zeros((1, 1, r)).at[0, 0, s].set(1e4), jnp.ones((1,)))
    logits, _, _ = fast_decoder.teacher_forced(params, features,
                                               tokens_in[:1], regions=forced)
    return -optax.softmax_cross_entropy_with_integer_labels(
        logits, targets[:1]).sum()

  rewards = jnp.stack([reward(s) for s in range(r)])

  def expected(v):
    p = {**params, "attention": {**params["attention"], "v": v}}
    _, alphas, _ = fast_decoder.teacher_forced(p, features, tokens_in[:1])
    return (alphas[0, 0] * rewards).sum()

  exact = -jax.grad(expected)(params["attention"]["v"])
  cosine = float(estimate @ exact / jnp.linalg.norm(estimate)
                 / jnp.linalg.norm(exact))
  assert cosine > 0.98, (estimate, exact)
  np.testing.assert_allclose(jnp.linalg.norm(estimate),
                             jnp.linalg.norm(exact), rtol=0.1)


def _hard_config(data_dir=""):
  config = tiny.get_config()
  config.data_dir = data_dir
  config.model.attention = "hard"
  config.alpha_c = 0.0  # No doubly stochastic penalty with hard attention.
  return config


def test_the_hard_terms_give_the_reference_codes_gradient_on_alpha():
  """`capgen.py`'s `known_grads` on alpha at its batch of 16, in units of
  its cross-entropy, equals the gradient of our terms in units of ours."""
  rng = np.random.RandomState(1)
  b, t, v, r = 4, 3, 6, 5
  logits = rng.randn(b, t, v).astype(np.float32)
  targets = rng.randint(0, v, (b, t))
  mask = np.ones((b, t), np.float32)  # Full captions: per word = per step.
  alphas = jax.nn.softmax(rng.randn(b, t, r).astype(np.float32), -1)
  chosen = rng.randint(0, r, (b, t)).astype(np.int32)
  regions = attention.Regions(jnp.zeros((b, t, r)), jnp.ones((b,)))
  baseline = -1.5
  config = tiny.get_config()

  def ours(alphas):
    terms = jax.vmap(
        lambda *a: hard_attention.loss_terms(
            *a, regions, jnp.float32(baseline), False, decay=0.9),
        axis_name="batch")(*(x[None] for x in (logits, targets, mask,
                                               alphas, chosen)))
    terms = jax.tree.map(lambda x: x[0], terms)
    return hard_attention.loss(terms, jnp.float32(mask.sum()), config)

  # Our cross-entropy weighs each word 1 / N.
  grad = np.asarray(jax.grad(ours)(jnp.asarray(alphas))) * mask.sum()
  # The code's: (c_bar - c_b) / 10 * (-s / alpha) + 0.002 (log alpha + 1),
  # against a cross-entropy that weighs each word 1 / B_ref.
  cost = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                             targets[..., None], -1)[..., 0]  # [B, T]
  c_b, c_bar = cost.mean(1), -baseline
  sample = np.eye(r, dtype=np.float32)[chosen]  # [B, T, R]
  reference = ((c_bar - c_b)[:, None, None] / 10 * (-sample / alphas)
               + 0.002 * (np.log(alphas) + 1))
  np.testing.assert_allclose(grad, 16 * reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_without_sampling_the_hard_step_is_the_soft_step():
  config = _hard_config()
  config.warmup_steps = 0
  config.model.dropout_rate = 0.0  # The two steps split their keys apart.
  config.hard_attention.sample_prob = 0.0
  config.hard_attention.entropy_weight = 0.0
  soft_config = tiny.get_config()
  soft_config.warmup_steps = 0
  soft_config.model.dropout_rate = 0.0
  soft_config.alpha_c = config.alpha_c
  batch = jax.tree.map(lambda x: x[None], fake_batch(config, 20, 8))
  out = []
  for c in (config, soft_config):
    state = state_lib.create_train_state(jax.random.key(0), c, 20)
    p_train_step, _ = step_lib.compile_steps(c, jax.local_devices()[:1])
    state, metrics = p_train_step(state, batch, jax.random.key(1))
    out.append((jax.device_get(state.params), jax.device_get(metrics)))
  (hard_params, hard_metrics), (soft_params, soft_metrics) = out
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               hard_params, soft_params)
  np.testing.assert_allclose(hard_metrics["xent"], soft_metrics["xent"],
                             rtol=1e-6)
  assert {"reward", "baseline", "entropy"} <= set(hard_metrics)


@pytest.mark.slow
def test_a_hard_run_resumes_exactly_and_decodes_one_region_per_word(
    tiny_data_dir, tmp_path):
  config = _hard_config(tiny_data_dir)
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 4
  straight = str(tmp_path / "straight")
  results = train.train_and_evaluate(config, straight)
  assert 0.0 <= results["grounding"] <= 1.0

  halves = str(tmp_path / "halves")
  shutil.copytree(straight, halves)
  shutil.rmtree(os.path.join(halves, "checkpoints", "4"))
  shutil.rmtree(os.path.join(halves, "best"))
  train.train_and_evaluate(config, halves)
  states = []
  for workdir in (straight, halves):
    run = restore.restore_run(workdir)
    assert run.step == 4
    ckpt_state = train.checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints")).restore_state(
            state_lib.create_train_state(jax.random.key(0), config,
                                         len(run.vocab)))
    states.append(ckpt_state)
  jax.tree.map(np.testing.assert_array_equal, states[0].params,
               states[1].params)
  # The moving-average baseline is part of the state and came back too.
  assert float(states[0].attention_baseline) < 0.0
  assert float(states[0].attention_baseline) == float(
      states[1].attention_baseline)

  # Decoding reads one region per word: every map is one-hot (zeros after
  # the caption's end).
  weights = captioner.decoding_weights(states[0].params["decoder"], "float32",
                                       "hard")
  feats = jax.random.normal(jax.random.key(2),
                            (2, captioner.num_regions(config),
                             resnet.feature_dim(config.model.resnet_size,
                                                config.model.resnet_width)))
  for beam in (1, 3):
    decoded = captioner.beam_caption(weights, feats, beam_size=beam,
                                     max_length=6)
    alphas = np.asarray(decoded.alphas)
    assert set(np.unique(alphas)) <= {0.0, 1.0}
    assert set(np.unique(alphas.sum(-1))) <= {0.0, 1.0}


def test_attention_kind_is_checked_and_shapes_the_state():
  config = _hard_config()
  config.model.attention = "firm"
  with pytest.raises(errors.ConfigError, match="model.attention"):
    config_checks.validate(config)
  config = _hard_config()
  config.hard_attention.sample_prob = 1.5
  with pytest.raises(errors.ConfigError, match="sample_prob"):
    config_checks.validate(config)
  config = _hard_config()
  config.alpha_c = 0.01
  with pytest.raises(errors.ConfigError, match="config.alpha_c must be 0"):
    config_checks.validate(config)
  config_checks.validate(_hard_config())
  saved = tiny.get_config()  # A soft-attention run.
  config_checks.check_resume(saved, tiny.get_config(), "/run")
  with pytest.raises(errors.ConfigError, match="model.attention"):
    config_checks.check_resume(saved, _hard_config(), "/run")


def test_decoding_rule_of_hard_attention_runs():
  assert captioner.decoding_attention(tiny.get_config()) == "soft"
  config = _hard_config()
  # The expected context, as the authors' code decodes its stochastic model
  # (arctic-captions generate_caps.py: sampling=False, no argmax).
  assert captioner.decoding_attention(config) == "soft"
  config.hard_attention.decoding = "hard"  # The most likely region.
  assert captioner.decoding_attention(config) == "hard"
  # A soft attention run always decodes soft.
  config.model.attention = "soft"
  assert captioner.decoding_attention(config) == "soft"


@pytest.mark.parametrize("decoding", ["default", "soft", "hard"])
def test_a_hard_model_decodes_the_expected_context_unless_told(decoding):
  config = _hard_config()
  if decoding != "default":
    config.hard_attention.decoding = decoding
  params = state_lib.create_train_state(jax.random.key(0), config,
                                        12).params["decoder"]
  feats = jax.random.normal(jax.random.key(2),
                            (2, captioner.num_regions(config),
                             resnet.feature_dim(config.model.resnet_size,
                                                config.model.resnet_width)))
  decoded = {}
  for rule in ("configured", "soft"):
    weights = captioner.decoding_weights(
        params, "float32",
        captioner.decoding_attention(config) if rule == "configured"
        else "soft")
    decoded[rule] = captioner.beam_caption(weights, feats, beam_size=3,
                                           max_length=6)
  # [B, R]: every caption's first word has its map.
  first = np.asarray(decoded["configured"].alphas)[:, 0]
  np.testing.assert_allclose(first.sum(-1), 1.0, rtol=1e-5)
  if decoding == "hard":
    assert set(np.unique(first)) == {0.0, 1.0}  # One region per word.
  else:
    # Alpha itself, spread over the regions: the decoder read their mix,
    # exactly as a soft attention model's decoding does.
    assert first.max() < 0.9 and first.min() > 0.0
    for field in ("tokens", "alphas"):
      np.testing.assert_array_equal(getattr(decoded["configured"], field),
                                    getattr(decoded["soft"], field))


def test_evaluate_can_decode_a_run_the_other_way():
  config = _hard_config()
  assert evaluate.settings(config).hard_attention.decoding == "soft"
  hard = evaluate.settings(config, hard_attention_decoding="hard")
  assert hard.hard_attention.decoding == "hard"
  assert config.hard_attention.decoding == "soft"  # The run's is kept.
