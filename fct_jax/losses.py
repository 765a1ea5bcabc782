"""Losses as pure jnp functions with keyword-only arguments."""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from fct_jax.config_schema import LOSS_KINDS


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / max(‖x‖₂, eps) along ``axis`` (PyTorch's ``F.normalize`` semantics), computed in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def cosine_logits(x, kernel):
  """ArcFace's logits: cosines [B, C] in [-1, 1] between the rows of x [B, D] and the columns of kernel [D, C],
  both L2-normalised (``models.heads.ArcFaceHead`` and BCT through an ArcFace old model); a zero column gives 0."""
  return jnp.clip(jnp.dot(l2_normalize(x, axis=-1), l2_normalize(kernel, axis=0)), -1.0, 1.0)


def softmax_cross_entropy(*, logits, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy with label smoothing.

  Args:
    logits: [B, C] float.
    labels: [B] int class ids.
    label_smoothing: ε; targets become (1-ε)·onehot + ε/C.
  Returns:
    scalar float32.
  """
  return jnp.mean(softmax_cross_entropy_per_item(logits=logits, labels=labels, label_smoothing=label_smoothing))


def softmax_cross_entropy_per_item(*, logits, labels, label_smoothing: float = 0.0):
  """Per-item softmax cross-entropy with label smoothing ([B] float32): :func:`softmax_cross_entropy` before the
  mean (ml-fct's ``LabelSmoothing(reduction="none")``: (1 − ε)·NLL + ε·mean_c(−log p_c), the same targets)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) if label_smoothing else \
      jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def l2_transformation_loss(*, pred, target):
  """FCT's transformation loss: mean squared error over batch and features.

  ml-fct: ``nn.MSELoss()`` (mean over all B·D elements), i.e. ‖h(φ_old, ψ) − φ_new‖² / D averaged over the batch.

  Args: pred, target: [B, D].  Returns: scalar float32.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(diff * diff)


def soft_cross_entropy(*, logits, targets):
  """Mean cross-entropy against soft targets (mixup, label smoothing done by the caller).

  Args:
    logits: [B, C] float.
    targets: [B, C] non-negative rows summing to 1.
  Returns:
    scalar float32.
  """
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)))


def mse_loss(*, pred, target):
  """Mean squared error over every element (the autoencoder's reconstruction loss).

  Args: pred, target: same shape, e.g. [B, H, W, 3].  Returns: scalar float32.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(diff * diff)


def arcface_logits(*, cosine, labels, scale: float, margin: float):
  """ArcFace logits: s·cos(θ_y + m) for the true class, s·cos θ_j for the others (Deng et al. 2019, Eq. 3).

  Where θ_y + m would pass π, cos(θ+m) stops being monotonic in θ; like the reference insightface
  implementation we then use the linear fallback cos θ − m·sin m, so the target logit keeps decreasing with θ.

  Args:
    cosine: [B, C] cosines between normalised embeddings and normalised class weights (``ArcFaceHead``).
    labels: [B] int class ids.
    scale: s.
    margin: additive angular margin m in radians.
  Returns:
    [B, C] float32 logits.
  """
  cos = jnp.clip(cosine.astype(jnp.float32), -1.0, 1.0)
  # sqrt(1 − cos²) has an infinite derivative at cos = ±1; the floor keeps gradients finite there.
  sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, 1e-12))
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  cos_theta_plus_m = cos * cos_m - sin * sin_m
  threshold = jnp.cos(jnp.pi - margin)  # θ + m ≤ π  ⇔  cos θ ≥ cos(π − m)
  target_logit = jnp.where(cos > threshold, cos_theta_plus_m, cos - margin * sin_m)
  onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  return scale * jnp.where(onehot, target_logit, cos)


def arcface_loss(*, cosine, labels, scale: float, margin: float, label_smoothing: float = 0.0):
  """ArcFace additive angular margin loss: softmax cross-entropy on ``arcface_logits``.

  With margin 0 and scale 1 it is plain softmax cross-entropy on the cosines.

  Args:
    cosine: [B, C] cosines from ``ArcFaceHead``.
    labels: [B] int class ids.
    scale: s (64 in the ArcFace paper).
    margin: m in radians (0.5 in the ArcFace paper).
    label_smoothing: ε as in ``softmax_cross_entropy``.
  Returns:
    scalar float32.
  """
  logits = arcface_logits(cosine=cosine, labels=labels, scale=scale, margin=margin)
  return softmax_cross_entropy(logits=logits, labels=labels, label_smoothing=label_smoothing)


def nt_xent_loss(*, z1, z2, temperature: float = 0.1):
  """SimCLR's NT-Xent loss over the whole (global) batch.

  The 2B projections are L2-normalised; for each one the positive is its other view and the negatives are the
  other 2B − 2 projections; the loss is the mean over all 2B anchors of −log softmax(sim/τ)[positive], with the
  anchor itself excluded from the softmax.

  Under ``jit`` with z1/z2 sharded on the mesh's 'data' axis this plain formula is already global: XLA gathers
  what the [2B, 2B] similarity matrix needs, so every device's samples serve as negatives for every other's — what
  SimCLR gets with an explicit all-gather. No axis_name is needed (and none is taken).

  Args:
    z1, z2: [B, D] projections of the two views; row i of z1 and row i of z2 come from the same image.
    temperature: τ.
  Returns:
    scalar float32.
  """
  b = z1.shape[0]
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  z = l2_normalize(z)
  sim = jnp.dot(z, z.T, precision=jax.lax.Precision.HIGHEST) / temperature
  # -inf on the diagonal removes each anchor from its own softmax denominator.
  sim = jnp.where(jnp.eye(2 * b, dtype=jnp.bool_), -jnp.inf, sim)
  positive = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  log_prob = jax.nn.log_softmax(sim, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_prob, positive[:, None], axis=-1))


def class_feature_sums(*, features, labels, num_classes: int, weights=None):
  """Per-class sums and counts of features, to accumulate class means over a dataset in batches.

  Args:
    features: [N, D] (e.g. old-model embeddings of new-training-set images).
    labels: [N] int class ids in [0, num_classes).
    num_classes: C.
    weights: optional [N] 0/1 mask (padding examples of the last batch get 0).
  Returns:
    (sums [C, D] float32, counts [C] float32).
  """
  w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * w[:, None]
  sums = jnp.dot(onehot.T, features.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return sums, jnp.sum(onehot, axis=0)


def bct_extend_classifier(*, old_classifier, feature_sums, counts):
  """The old classifier extended to new classes with class means of old-model features (BCT, Shen et al. 2020).

  BCT classifies new embeddings with the frozen old classifier; classes the old model never saw get, as their
  weight vector, the mean old-model feature of their training images. Columns of classes already in the old
  classifier are kept; new classes without any example get a zero column (logit 0).

  Args:
    old_classifier: [D, C_old] kernel of the old model's bias-free linear classifier.
    feature_sums: [C, D] per-class sums of old-model features over the new training set (``class_feature_sums``).
    counts: [C] per-class example counts; C ≥ C_old.
  Returns:
    [D, C] float32 kernel.
  """
  c_old = old_classifier.shape[1]
  means = feature_sums / jnp.maximum(counts, 1.0)[:, None]
  return jnp.concatenate([old_classifier.astype(jnp.float32), means[c_old:].T.astype(jnp.float32)], axis=1)




def classification_loss(*, logits, labels, kind: str = "softmax", label_smoothing: float = 0.0,
                        scale: Optional[float] = None, margin: Optional[float] = None):
  """The classifier loss of a stage: ``kind="softmax"``, cross-entropy of ``logits``; ``kind="arcface"``, the
  ArcFace loss of ``logits`` read as cosines (an ArcFace head) with ``scale`` s and ``margin`` m (required then:
  their defaults are the stage config's, ``fct_jax.config_schema``)."""
  if kind not in LOSS_KINDS:
    raise ValueError(f"unknown classification loss kind {kind!r}; valid: {', '.join(LOSS_KINDS)}")
  if kind == "arcface":
    if scale is None or margin is None:
      raise ValueError("the arcface loss needs its scale and margin")
    return arcface_loss(cosine=logits, labels=labels, scale=scale, margin=margin, label_smoothing=label_smoothing)
  return softmax_cross_entropy(logits=logits, labels=labels, label_smoothing=label_smoothing)


def classification_loss_per_item(*, logits, labels, kind: str = "softmax", label_smoothing: float = 0.0,
                                 scale: Optional[float] = None, margin: Optional[float] = None):
  """:func:`classification_loss` per item ([B] float32), before the mean over the batch."""
  if kind not in LOSS_KINDS:
    raise ValueError(f"unknown classification loss kind {kind!r}; valid: {', '.join(LOSS_KINDS)}")
  if kind == "arcface":
    if scale is None or margin is None:
      raise ValueError("the arcface loss needs its scale and margin")
    logits = arcface_logits(cosine=logits, labels=labels, scale=scale, margin=margin)
  return softmax_cross_entropy_per_item(logits=logits, labels=labels, label_smoothing=label_smoothing)


def frozen_classifier_logits(*, embedding, classifier, kind: str = "softmax", bias=None):
  """Logits of ``embedding`` [B, D] through a frozen classifier kernel [D, C] (no gradient into the kernel; the
  gradient flows into the embedding): ``embedding · W (+ bias)`` for a linear head, the cosines of an ArcFace head
  (``kind="arcface"``; a zero column gives cosine 0). BCT's influence loss and FastFill's discriminative loss."""
  if embedding.shape[-1] != classifier.shape[0]:
    raise ValueError(f"embedding width {embedding.shape[-1]} != classifier input width {classifier.shape[0]}")
  emb = embedding.astype(jnp.float32)
  w = jax.lax.stop_gradient(classifier).astype(jnp.float32)
  if kind == "arcface":
    return cosine_logits(emb, w)
  logits = jnp.dot(emb, w)
  return logits if bias is None else logits + jax.lax.stop_gradient(bias).astype(jnp.float32)


def fastfill_loss(*, pred, target, log_var=None, logits=None, labels=None, mu_sim: float = 1.0, mu_disc: float = 1.0,
                  mu_unc: float = 0.5, label_smoothing: float = 0.1, kind: str = "softmax",
                  scale: Optional[float] = None, margin: Optional[float] = None):
  """FastFill's transformation loss (Jaeckle et al., ICLR 2023; ml-fct@1a7f8b5 ``UncertaintyLoss``).

  Per item ℓ = mu_sim · mean_d (h − φ_new)² + mu_disc · CE(κ_new(h), y), the CE label-smoothed with the new model's
  own loss ``kind`` (``logits``: κ_new(h), see :func:`frozen_classifier_logits`); the total is
  mean_B(½ e^{−s} ℓ + mu_unc · s) with s = ``log_var`` [B, 1] (σ² the predicted error variance: items h maps badly
  learn a large s instead of dominating the loss). Without ``log_var``: mean_B(ℓ). With a per-dimension s [B, D]
  each dimension's weight e^{−s_d} applies to that dimension's squared error and their mean to the CE, and the
  regulariser is mu_unc · mean_d s_d; this equals the width-1 loss when every s_d is equal. (ml-fct's code only
  broadcasts correctly for width 1.)

  With s ≡ 0 and mu_disc = 0 the loss is ½ · :func:`l2_transformation_loss`.

  Args:
    pred: [B, D] h(φ_old, ψ); target: [B, D] φ_new.
    log_var: [B, 1] or [B, D] s, or None.
    logits: [B, C] κ_new(h) (needed when mu_disc ≠ 0); labels: [B] int.
    mu_sim, mu_disc, mu_unc, label_smoothing: the loss weights and ε.
    kind, scale, margin: the new model's classification loss (``classification_loss_per_item``).
  Returns:
    scalar float32.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  sq = diff * diff
  ce = 0.0
  if mu_disc:
    if logits is None or labels is None:
      raise ValueError("the FastFill loss with mu_disc != 0 needs the new classifier's logits and the labels")
    ce = classification_loss_per_item(logits=logits, labels=labels, kind=kind, label_smoothing=label_smoothing,
                                      scale=scale, margin=margin)
  if log_var is None:
    return jnp.mean(mu_sim * jnp.mean(sq, axis=-1) + mu_disc * ce)
  s = log_var.astype(jnp.float32)
  if s.ndim != 2 or s.shape[-1] not in (1, sq.shape[-1]):
    raise ValueError(f"log_var must be [B, 1] or [B, {sq.shape[-1]}], got {tuple(s.shape)}")
  w = jnp.exp(-s)
  weighted = mu_sim * jnp.mean(w * sq, axis=-1) + mu_disc * jnp.mean(w, axis=-1) * ce
  return jnp.mean(0.5 * weighted + mu_unc * jnp.mean(s, axis=-1))


def bct_influence_loss(*, new_embedding, old_classifier, labels, label_smoothing: float = 0.0,
                       kind: str = "softmax", scale: Optional[float] = None, margin: Optional[float] = None):
  """BCT's influence loss: the old model's own classification loss of the new embedding through its frozen classifier.

  The old classifier receives no gradient (``stop_gradient``): only φ_new learns to live in the old space.
  ``kind="softmax"``: cross-entropy of φ_new · W (the old linear head). ``kind="arcface"`` (an old model trained
  with an ``ArcFaceHead``): the cosines between the normalised φ_new and the normalised columns of W go through
  ``arcface_loss`` with the old model's ``scale`` and ``margin`` — the head and loss the old model was trained with.

  Args:
    new_embedding: [B, D] φ_new(x); D must equal the old embedding width.
    old_classifier: [D, C] frozen (possibly ``bct_extend_classifier``-extended) kernel.
    labels: [B] int class ids in [0, C).
    label_smoothing: ε.
    kind: the old model's loss, "softmax" or "arcface".
    scale, margin: the old model's ArcFace s and m (``kind="arcface"`` only).
  Returns:
    scalar float32.
  """
  if new_embedding.shape[-1] != old_classifier.shape[0]:
    raise ValueError(f"BCT needs equal embedding widths: new {new_embedding.shape[-1]} vs old classifier "
                     f"{old_classifier.shape[0]}")
  logits = frozen_classifier_logits(embedding=new_embedding, classifier=old_classifier, kind=kind)
  return classification_loss(logits=logits, labels=labels, kind=kind, label_smoothing=label_smoothing, scale=scale,
                             margin=margin)


def mixup_with(*, images, labels, num_classes: int, lam, perm, mix_labels: bool = False):
  """Deterministic mixup: x̃ = λ·x + (1 − λ)·x[perm].

  Args:
    images: [B, H, W, C] float.
    labels: [B] int.
    num_classes: C.
    lam: scalar λ in [0, 1].
    perm: [B] int permutation of the batch.
    mix_labels: mix the one-hot targets with the same λ (standard mixup). False keeps one-hot targets of the
      original image — the paper's "φ_old w/ Mixup" side-information model ("applied only on images, for labels
      we use one-hot vectors").
  Returns:
    (mixed images [B, H, W, C] in the images' dtype, targets [B, num_classes] float32).
  """
  lam = jnp.asarray(lam, jnp.float32)
  mixed = lam * images.astype(jnp.float32) + (1.0 - lam) * images[perm].astype(jnp.float32)
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mix_labels:
    targets = lam * targets + (1.0 - lam) * targets[perm]
  return mixed.astype(images.dtype), targets


def mixup(*, rng, images, labels, num_classes: int, alpha: float = 0.2, mix_labels: bool = False):
  """Mixup (Zhang et al. 2018) with λ ~ Beta(α, α) shared by the batch and a random pairing.

  The permutation is over the global batch (under jit a sharded batch is one array), so partners can come from
  other devices. The paper does not give α; 0.2 is mixup's ImageNet value.

  Args:
    rng: PRNG key.
    images, labels, num_classes, mix_labels: as in ``mixup_with``.
    alpha: Beta parameter.
  Returns:
    (mixed images, targets [B, num_classes]).
  """
  k_lam, k_perm = jax.random.split(rng)
  lam = jax.random.beta(k_lam, alpha, alpha)
  perm = jax.random.permutation(k_perm, images.shape[0])
  return mixup_with(images=images, labels=labels, num_classes=num_classes, lam=lam, perm=perm,
                    mix_labels=mix_labels)
