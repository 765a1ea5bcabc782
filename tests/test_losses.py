"""Losses against NumPy brute force on tiny hand-built inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fct_jax import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- softmax cross-entropy ------------------------------------------------------------------------------------------

def test_softmax_cross_entropy_matches_numpy_and_smoothing_limits():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([0, 3, 1, 1, 2])
  logp = _np_log_softmax(logits.astype(np.float64))
  want = -logp[np.arange(5), labels].mean()
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits=logits, labels=labels), want, rtol=1e-5)
  # ε = 1: the target is uniform, the loss is the mean negative log-probability over classes.
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits=logits, labels=labels, label_smoothing=1.0),
                             -logp.mean(), rtol=1e-5)
  # ε in between: a convex combination of the two.
  eps = 0.1
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits=logits, labels=labels, label_smoothing=eps),
                             (1 - eps) * want + eps * -logp.mean(), rtol=1e-5)
  # Confident correct logits: ~0 without smoothing, but bounded below by the smoothing mass with it.
  big = 50.0 * np.eye(4, dtype=np.float32)[labels]
  assert float(losses.softmax_cross_entropy(logits=big, labels=labels)) < 1e-6
  assert float(losses.softmax_cross_entropy(logits=big, labels=labels, label_smoothing=0.1)) > 1.0


def test_soft_cross_entropy_equals_hard_for_one_hot():
  logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  labels = jnp.array([1, 2])
  np.testing.assert_allclose(losses.soft_cross_entropy(logits=logits, targets=jax.nn.one_hot(labels, 3)),
                             losses.softmax_cross_entropy(logits=logits, labels=labels), rtol=1e-6)


def test_l2_and_mse():
  pred = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  target = jnp.array([[0.0, 2.0], [3.0, 2.0]])
  # nn.MSELoss: mean over all B·D elements = (1 + 0 + 0 + 4) / 4.
  assert float(losses.l2_transformation_loss(pred=pred, target=target)) == pytest.approx(1.25)
  assert float(losses.mse_loss(pred=pred[None], target=target[None])) == pytest.approx(1.25)


# --- ArcFace --------------------------------------------------------------------------------------------------------

def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_arcface_reduces_to_softmax_without_margin():
  rng = np.random.default_rng(1)
  emb, w = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(5, 8)))
  cosine = (emb @ w.T).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 0])
  np.testing.assert_allclose(losses.arcface_loss(cosine=cosine, labels=labels, scale=1.0, margin=0.0),
                             losses.softmax_cross_entropy(logits=cosine, labels=labels), rtol=1e-5)


def test_arcface_margin_against_numpy():
  cosine = np.array([[0.9, 0.1, -0.2], [0.3, -0.95, 0.5], [-0.99, 0.2, 0.0]], np.float32)
  labels = np.array([0, 1, 0])
  s, m = 30.0, 0.5
  theta = np.arccos(cosine.astype(np.float64))
  logits = s * cosine.astype(np.float64)
  for i, y in enumerate(labels):
    if theta[i, y] + m <= np.pi:
      logits[i, y] = s * np.cos(theta[i, y] + m)
    else:  # insightface's fallback beyond π: cos θ − m·sin m
      logits[i, y] = s * (cosine[i, y] - m * np.sin(m))
  np.testing.assert_allclose(losses.arcface_logits(cosine=cosine, labels=labels, scale=s, margin=m), logits,
                             rtol=1e-5, atol=1e-5)
  want = -_np_log_softmax(logits)[np.arange(3), labels].mean()
  np.testing.assert_allclose(losses.arcface_loss(cosine=cosine, labels=labels, scale=s, margin=m), want, rtol=1e-5)


def test_arcface_gradient_finite_at_saturated_cosines():
  cosine = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
  g = jax.grad(lambda c: losses.arcface_loss(cosine=c, labels=jnp.array([0, 0]), scale=64.0, margin=0.5))(cosine)
  assert np.all(np.isfinite(np.asarray(g)))


# --- NT-Xent --------------------------------------------------------------------------------------------------------

def _np_nt_xent(z1, z2, tau):
  z = _unit(np.concatenate([z1, z2]).astype(np.float64))
  n, b = len(z), len(z1)
  total = 0.0
  for i in range(n):
    j = (i + b) % n
    denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)
    total += -np.log(np.exp(z[i] @ z[j] / tau) / denom)
  return total / n


def test_nt_xent_against_numpy():
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  for tau in (0.1, 0.5):
    np.testing.assert_allclose(losses.nt_xent_loss(z1=z1, z2=z2, temperature=tau), _np_nt_xent(z1, z2, tau),
                               rtol=1e-5)
  # Identical, orthogonal views: every positive has similarity 1, every negative 0.
  eye = np.eye(3, dtype=np.float32)
  want = -np.log(np.e / (np.e + 4.0))  # τ = 1, 2B − 2 = 4 negatives at exp(0)
  np.testing.assert_allclose(losses.nt_xent_loss(z1=eye, z2=eye, temperature=1.0), want, rtol=1e-5)
  g = jax.grad(lambda a: losses.nt_xent_loss(z1=a, z2=z2))(jnp.asarray(z1))
  assert np.all(np.isfinite(np.asarray(g)))


def test_nt_xent_is_global_across_devices():
  """A batch sharded over 8 devices gives the full-batch loss: negatives come from every device."""
  devices = np.array(jax.devices())
  assert devices.size == 8, "conftest sets 8 simulated CPU devices"
  mesh = Mesh(devices, ("data",))
  rng = np.random.default_rng(3)
  z1, z2 = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=(16, 5)).astype(np.float32)
  sharding = NamedSharding(mesh, P("data"))
  s1, s2 = jax.device_put(z1, sharding), jax.device_put(z2, sharding)
  fn = jax.jit(lambda a, b: losses.nt_xent_loss(z1=a, z2=b, temperature=0.2))
  np.testing.assert_allclose(fn(s1, s2), _np_nt_xent(z1, z2, 0.2), rtol=1e-5)
  # The per-device (local-batch) loss would differ: proves the negatives really span devices.
  local = np.mean([_np_nt_xent(z1[i:i + 2], z2[i:i + 2], 0.2) for i in range(0, 16, 2)])
  assert abs(local - float(fn(s1, s2))) > 1e-3


# --- BCT ------------------------------------------------------------------------------------------------------------

def test_bct_extend_classifier_with_class_means():
  old_w = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], np.float32)  # D=3, C_old=2
  feats = np.array([[1, 1, 1], [3, 3, 3], [0, 2, 4], [9, 9, 9], [5, 5, 5]], np.float32)
  labels = np.array([2, 2, 3, 0, 2])
  sums, counts = losses.class_feature_sums(features=feats, labels=labels, num_classes=5)
  np.testing.assert_allclose(counts, [1, 0, 3, 1, 0])
  # Accumulating over two batches gives the same as one.
  s_a, c_a = losses.class_feature_sums(features=feats[:2], labels=labels[:2], num_classes=5)
  s_b, c_b = losses.class_feature_sums(features=feats[2:], labels=labels[2:], num_classes=5)
  np.testing.assert_allclose(s_a + s_b, sums)
  np.testing.assert_allclose(c_a + c_b, counts)
  w = losses.bct_extend_classifier(old_classifier=old_w, feature_sums=sums, counts=counts)
  assert w.shape == (3, 5)
  np.testing.assert_allclose(w[:, :2], old_w)                 # old classes keep the old weights
  np.testing.assert_allclose(w[:, 2], feats[[0, 1, 4]].mean(0))  # new class 2: mean old feature
  np.testing.assert_allclose(w[:, 3], feats[2])
  np.testing.assert_allclose(w[:, 4], 0.0)                    # no example: zero column
  # A padding mask excludes examples.
  _, c_masked = losses.class_feature_sums(features=feats, labels=labels, num_classes=5,
                                          weights=np.array([1, 1, 1, 1, 0]))
  np.testing.assert_allclose(c_masked, [1, 0, 2, 1, 0])


def test_bct_influence_loss_and_frozen_classifier():
  rng = np.random.default_rng(4)
  emb = rng.normal(size=(4, 3)).astype(np.float32)
  w = rng.normal(size=(3, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2])
  want = -_np_log_softmax(emb.astype(np.float64) @ w)[np.arange(4), labels].mean()
  np.testing.assert_allclose(losses.bct_influence_loss(new_embedding=emb, old_classifier=w, labels=labels), want,
                             rtol=1e-5)
  g_w = jax.grad(lambda k: losses.bct_influence_loss(new_embedding=emb, old_classifier=k, labels=labels))(w)
  np.testing.assert_array_equal(g_w, 0.0)
  with pytest.raises(ValueError, match="equal embedding widths"):
    losses.bct_influence_loss(new_embedding=emb[:, :2], old_classifier=w, labels=labels)


# --- mixup ----------------------------------------------------------------------------------------------------------

def test_mixup_with_against_numpy():
  images = np.arange(4 * 2 * 2 * 1, dtype=np.float32).reshape(4, 2, 2, 1)
  labels = np.array([0, 1, 2, 1])
  perm = np.array([2, 0, 3, 1])
  lam = 0.7
  x, t = losses.mixup_with(images=images, labels=labels, num_classes=3, lam=lam, perm=perm)
  np.testing.assert_allclose(x, lam * images + (1 - lam) * images[perm], rtol=1e-6)
  np.testing.assert_allclose(t, np.eye(3)[labels])  # paper: images only, one-hot targets
  _, t_mix = losses.mixup_with(images=images, labels=labels, num_classes=3, lam=lam, perm=perm, mix_labels=True)
  np.testing.assert_allclose(t_mix, lam * np.eye(3)[labels] + (1 - lam) * np.eye(3)[labels[perm]], rtol=1e-6)
  np.testing.assert_allclose(t_mix.sum(-1), 1.0, rtol=1e-6)


def test_mixup_random_is_a_convex_pairing():
  images = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[:, None, None, None], (8, 2, 2, 3))
  x, t = jax.jit(lambda r, im: losses.mixup(rng=r, images=im, labels=jnp.arange(8), num_classes=8, alpha=1.0,
                                            mix_labels=True))(jax.random.key(0), images)
  assert x.shape == images.shape and x.dtype == images.dtype
  # Each mixed value is λ·i + (1 − λ)·perm(i); the targets carry λ on i and 1 − λ on perm(i) (1 on fixed points).
  t = np.asarray(t)
  diag = np.diag(t)
  moved = diag < 1 - 1e-6
  lam = float(diag[moved][0]) if moved.any() else 1.0
  assert 0.0 <= lam <= 1.0
  partner = np.where(moved, np.argmax(t - np.diag(diag), axis=-1), np.arange(8))
  assert sorted(partner.tolist()) == list(range(8))
  np.testing.assert_allclose(x[:, 0, 0, 0], lam * np.arange(8) + (1 - lam) * partner, rtol=1e-5, atol=1e-5)


def test_classification_loss_dispatches_on_kind():
  rng = np.random.default_rng(3)
  cosine = jnp.asarray(np.clip(rng.standard_normal((6, 4)) * 0.4, -1, 1), jnp.float32)
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  np.testing.assert_allclose(
      losses.classification_loss(logits=cosine, labels=labels, label_smoothing=0.1),
      losses.softmax_cross_entropy(logits=cosine, labels=labels, label_smoothing=0.1), rtol=1e-6)
  np.testing.assert_allclose(
      losses.classification_loss(logits=cosine, labels=labels, kind="arcface", scale=30.0, margin=0.3),
      losses.arcface_loss(cosine=cosine, labels=labels, scale=30.0, margin=0.3), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown classification loss kind 'triplet'"):
    losses.classification_loss(logits=cosine, labels=labels, kind="triplet")


def test_fastfill_loss_reduces_to_half_mse_and_weights_by_uncertainty():
  rng = np.random.default_rng(0)
  pred, target = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
  mse = float(losses.l2_transformation_loss(pred=pred, target=target))
  zero = np.zeros((6, 1), np.float32)
  assert float(losses.fastfill_loss(pred=pred, target=target, log_var=zero, mu_disc=0.0)) == pytest.approx(0.5 * mse)
  assert float(losses.fastfill_loss(pred=pred, target=target, mu_disc=0.0)) == pytest.approx(mse)  # no head
  # Against the official formula (per item ℓ, ½ e^{-s} ℓ + μ_unc s), with the label-smoothed CE.
  s = rng.standard_normal((6, 1)).astype(np.float32)
  logits, labels = rng.standard_normal((6, 3)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2])
  logp = _np_log_softmax(logits)
  ce = 0.9 * -logp[np.arange(6), labels] + 0.1 * -logp.mean(1)
  ell = ((pred - target) ** 2).mean(1) + 2.0 * ce
  want = np.mean(0.5 * np.exp(-s[:, 0]) * ell + 0.25 * s[:, 0])
  got = losses.fastfill_loss(pred=pred, target=target, log_var=s, logits=logits, labels=labels, mu_disc=2.0,
                             mu_unc=0.25, label_smoothing=0.1)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # A per-dimension s with equal entries is the width-1 loss.
  wide = losses.fastfill_loss(pred=pred, target=target, log_var=np.tile(s, (1, 5)), logits=logits, labels=labels,
                              mu_disc=2.0, mu_unc=0.25, label_smoothing=0.1)
  assert float(wide) == pytest.approx(float(got), rel=1e-5)
  with pytest.raises(ValueError, match="logits"):
    losses.fastfill_loss(pred=pred, target=target, log_var=s)


def test_fastfill_gradient_reaches_h_not_the_frozen_classifier():
  rng = np.random.default_rng(1)
  pred, target = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
  kernel, labels = rng.standard_normal((3, 5)).astype(np.float32), np.array([0, 1, 2, 3])

  def f(p, w):
    logits = losses.frozen_classifier_logits(embedding=p, classifier=w)
    return losses.fastfill_loss(pred=p, target=target, log_var=np.zeros((4, 1), np.float32), logits=logits,
                                labels=labels)

  g_pred, g_kernel = jax.grad(f, argnums=(0, 1))(pred, kernel)
  assert np.abs(np.asarray(g_kernel)).max() == 0.0  # κ_new is not updated
  g_sim = jax.grad(lambda p: losses.fastfill_loss(pred=p, target=target, log_var=np.zeros((4, 1), np.float32),
                                                  mu_disc=0.0))(pred)
  assert np.abs(np.asarray(g_pred) - np.asarray(g_sim)).max() > 1e-4  # the CE's gradient flows through κ_new into h
