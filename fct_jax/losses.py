"""Losses as pure jnp functions with keyword-only arguments."""

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(*, logits, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy with label smoothing.

  Args:
    logits: [B, C] float.
    labels: [B] int class ids.
    label_smoothing: ε; targets become (1-ε)·onehot + ε/C.
  Returns:
    scalar float32.
  """
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) if label_smoothing else \
      jax.nn.one_hot(labels, num_classes)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def l2_transformation_loss(*, pred, target):
  """FCT's transformation loss: mean squared error over batch and features.

  ml-fct: ``nn.MSELoss()`` (mean over all B·D elements), i.e. ‖h(φ_old, ψ) − φ_new‖² / D averaged over the batch.

  Args: pred, target: [B, D].  Returns: scalar float32.
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(diff * diff)
