"""Modules that wrap a backbone: SimCLR's encoder + projection head, and per-image input standardisation.

Both are the side-information stage's networks (``fct_jax.artifacts.build_side_model`` assembles them from a stage
config); they live here, beside the other Flax modules, so that training and loading build the same tree.
"""

import flax.linen as nn
import jax.numpy as jnp


class SimCLRModel(nn.Module):
  """Backbone ``encoder`` + ``projection`` head; returns the encoder's outputs plus ``projection`` [B, P]."""
  encoder: nn.Module
  projection: nn.Module

  def __call__(self, x, train: bool = False):
    out = dict(self.encoder(x, train=train))
    out["projection"] = self.projection(out["embedding"], train=train)
    return out


class InputStandardized(nn.Module):
  """``encoder`` on each image standardised by its own mean and standard deviation (over pixels and channels).

  Makes ψ exactly invariant to global affine intensity changes (like ``tf.image.per_image_standardization``).
  No parameters: the wrapped encoder's variables sit under ``encoder``. ``eps`` guards flat images.
  """
  encoder: nn.Module
  eps: float = 1e-3

  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    sd = jnp.std(x, axis=(1, 2, 3), keepdims=True)
    return self.encoder((x - mu) / (sd + self.eps), train=train)
