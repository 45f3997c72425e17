"""FashionBERT pretraining: the adaptive loss weights against a closed form and a
brute-force search, the adaptive update against separately computed task gradients,
the patch KL and retrieval ranks against numpy and hand-computed values, and a few
pretraining steps through the Trainer at tiny size."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from etjax.algorithms import fashionbert_pretrain as fp
from etjax.algorithms.step import next_rng, unbox
from etjax.data import fashion_synthetic as fs
from etjax.data import pipeline
from etjax.models import fashionbert as fb
from etjax.train.trainer import Trainer

SPECIALS = (fs.PAD_ID, fs.CLS_ID, fs.SEP_ID)


def _objective(w, gram):
  t = len(w)
  return 0.5 * w @ gram @ w + 0.5 * np.sum((w - 1.0 / t) ** 2)


def _brute_force(gram, steps=400):
  """The simplex minimiser by a grid over (w1, w2), then a finer grid around it."""
  best, best_w = np.inf, None
  lo, hi = np.zeros(2), np.ones(2)
  for _ in range(4):
    grid = [np.linspace(lo[i], hi[i], steps) for i in range(2)]
    w1, w2 = np.meshgrid(*grid, indexing="ij")
    w = np.stack([w1, w2, 1 - w1 - w2], -1).reshape(-1, 3)
    w = w[w[:, 2] >= 0]
    f = 0.5 * np.einsum("ni,ij,nj->n", w, gram, w) + 0.5 * ((w - 1 / 3) ** 2).sum(1)
    best_w = w[np.argmin(f)]
    best = f.min()
    span = (hi - lo) / steps * 4
    lo, hi = np.clip(best_w[:2] - span, 0, 1), np.clip(best_w[:2] + span, 0, 1)
  return best_w, best


def test_orthogonal_gradients_give_the_closed_form():
  # Orthogonal task gradients: G = diag(|g_i|^2); the KKT conditions give
  # w_i (1 + |g_i|^2) = const, so w_i = (1 + |g_i|^2)^-1 / sum_j (1 + |g_j|^2)^-1.
  with jax.enable_x64(True):
    for norms2 in ([0.0, 0.0, 0.0], [4.0, 0.25, 1.0], [100.0, 3.0, 0.01]):
      gram = jnp.diag(jnp.asarray(norms2, jnp.float64))
      w = np.asarray(fp.adaptive_weights(gram))
      inv = 1.0 / (1.0 + np.asarray(norms2))
      np.testing.assert_allclose(w, inv / inv.sum(), rtol=1e-12)


def test_correlated_gradients_match_brute_force_and_kkt():
  rng = np.random.default_rng(0)
  cases = [rng.normal(size=(3, 5)) * s for s in (0.3, 1.0, 3.0)]
  # A task whose gradient points along the other two's sum: its weight is 0.
  cases.append(np.array([[1.0, 0.0], [0.0, 1.0], [4.0, 4.0]]))
  with jax.enable_x64(True):
    for grads in cases:
      gram = grads @ grads.T
      w = np.asarray(fp.adaptive_weights(jnp.asarray(gram)))
      ref_w, ref_f = _brute_force(gram)
      assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
      assert _objective(w, gram) <= ref_f + 1e-9
      np.testing.assert_allclose(w, ref_w, atol=5e-4)
      # KKT: equal partial derivatives on the support, no smaller ones off it.
      d = gram @ w + (w - 1 / 3)
      on = w > 1e-9
      np.testing.assert_allclose(d[on], d[on].mean(), atol=1e-9)
      assert np.all(d[~on] >= d[on].mean() - 1e-9)
  assert np.asarray(fp.adaptive_weights(jnp.asarray(cases[-1] @ cases[-1].T)))[2] < 1e-7


def test_patch_kl_matches_numpy():
  rng = np.random.default_rng(2)
  logits, targets = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7)) * 2
  p = np.exp(targets) / np.exp(targets).sum(-1, keepdims=True)
  q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(fp.patch_kl(jnp.asarray(logits), jnp.asarray(targets)),
                             (p * np.log(p / q)).sum(-1), rtol=1e-5)


def test_retrieval_ranks_match_a_hand_computed_ranking():
  scores = np.array([[0.9, 0.1, 0.5, 0.3],    # positive 0 is best: rank 1
                     [0.2, 0.2, 0.1, 0.0],    # positive 1 ties with 0: rank 2
                     [0.3, 0.8, 0.7, 0.1],    # positive 0 below 0.8 and 0.7: rank 3
                     [0.4, 0.4, 0.4, 0.4]])   # all equal: worst rank, 4
  ranks = fp.retrieval_ranks(scores, np.array([0, 1, 0, 3]))
  np.testing.assert_array_equal(ranks, [1, 2, 3, 4])
  assert fp.rank_at_k(ranks, ks=(1, 2, 3)) == {"rank@1": 0.25, "rank@2": 0.5,
                                               "rank@3": 0.75}
  with pytest.raises(ValueError, match="scores"):
    fp.retrieval_ranks(scores[0], np.array([0]))


def _tiny_model():
  return fb.FashionBert(fb.FashionBertConfig.make(
      vocab_size=len(fs.VOCAB), hidden_size=16, num_layers=1, num_heads=2,
      intermediate_size=32, max_position_embeddings=fs.MAX_LENGTH, hidden_dropout=0.0,
      attention_dropout=0.0, image_input="pixels", image_size=16, patch_size=8,
      stem_channels=(4, 8)))


def test_adaptive_update_equals_weighted_separate_task_gradients():
  model = _tiny_model()
  lr = 0.1
  step = fp.fashionbert_pretrain(model, optax.sgd(lr), mask_token_id=fs.MASK_ID,
                                 special_token_ids=SPECIALS, mlm_prob=0.3, mpm_prob=0.3)
  batch = fs.model_arrays(fs.generate_pairs(8, seed=3, image_size=16))
  state = step.init(jax.random.key(0), batch)
  new_state, metrics = jax.jit(step.update)(state, batch)
  # The reference: each task's gradient on its own, the Gram matrix over the backbone
  # (heads excluded) in numpy, the weights from the simplex brute force.
  step_rng, _ = next_rng(state)
  params = state.params

  @jax.jit
  def separate_grads(p):
    def loss_i(i):
      return lambda p: fp.task_losses(model, p, batch, step_rng, mlm_prob=0.3,
                                      mpm_prob=0.3, mask_token_id=fs.MASK_ID,
                                      special_token_ids=SPECIALS)[0][i]
    return [jax.grad(loss_i(i))(p) for i in range(3)]

  grads = separate_grads(params)
  shared = [np.concatenate([np.ravel(v) for k, sub in unbox(g).items()
                            if k not in fb.HEAD_NAMES for v in jax.tree.leaves(sub)])
            for g in grads]
  gram = np.array([[a @ b for b in shared] for a in shared], np.float64)
  w_ref, _ = _brute_force(gram)
  w = np.array([metrics[f"w_{t}"] for t in fp.TASKS])
  np.testing.assert_allclose(w, w_ref, atol=5e-4)
  # SGD: new = old - lr * sum_i w_i g_i, with the step's own weights.
  expected = jax.tree.map(lambda p, g0, g1, g2: p - lr * (w[0] * g0 + w[1] * g1 +
                                                          w[2] * g2),
                          unbox(params), *[unbox(g) for g in grads])
  for a, b in zip(jax.tree.leaves(unbox(new_state.params)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(g > 0 for g in np.diag(gram))  # every task reaches the backbone


@pytest.mark.slow
def test_pretrains_a_few_steps_through_the_trainer(tmp_path):
  model = _tiny_model()
  step = fp.fashionbert_pretrain(model, optax.adam(3e-3), mask_token_id=fs.MASK_ID,
                                 special_token_ids=SPECIALS)
  data = fs.model_arrays(fs.generate_pairs(64, seed=0, image_size=16))
  trainer = Trainer(step, workdir=str(tmp_path), num_steps=30, log_every=10,
                    progress=False, tensorboard=False)
  eval_data = pipeline.eval_batches(data, 64)
  initial = trainer.init_state(data)
  result = trainer.fit(pipeline.train_iterator(data, 16, seed=0), eval_data)
  assert result.step == 30 and int(result.state.step) == 30
  m = result.train_metrics
  assert abs(m["w_mlm"] + m["w_mpm"] + m["w_itm"] - 1) < 1e-5
  assert set(result.eval_metrics) >= {"accuracy", "auc"}
  # The three losses, at fixed masks, fall on the data trained on.
  fixed_rng = jax.random.key(9)
  before, _ = fp.task_losses(model, initial.params, data, fixed_rng, mlm_prob=0.15,
                             mpm_prob=0.1, mask_token_id=fs.MASK_ID,
                             special_token_ids=SPECIALS, deterministic=True)
  after, _ = fp.task_losses(model, result.state.params, data, fixed_rng, mlm_prob=0.15,
                            mpm_prob=0.1, mask_token_id=fs.MASK_ID,
                            special_token_ids=SPECIALS, deterministic=True)
  assert np.all(np.isfinite(after)) and float(after[0]) < float(before[0])
  assert float(np.sum(after)) < float(np.sum(before))
  scores = trainer.predict(result.state, eval_data)["match_score"]
  assert scores.shape == (64,) and np.all(scores <= 0)


def test_bad_arguments_are_named():
  model = _tiny_model()
  with pytest.raises(ValueError, match="weighting"):
    fp.fashionbert_pretrain(model, optax.sgd(1.0), mask_token_id=4, special_token_ids=(),
                            weighting="uncertainty")
  with pytest.raises(ValueError, match="fixed_weights"):
    fp.fashionbert_pretrain(model, optax.sgd(1.0), mask_token_id=4, special_token_ids=(),
                            weighting="fixed", fixed_weights=(1.0, 1.0))
  with pytest.raises(ValueError, match="mpm_prob"):
    fp.fashionbert_pretrain(model, optax.sgd(1.0), mask_token_id=4, special_token_ids=(),
                            mpm_prob=1.5)
