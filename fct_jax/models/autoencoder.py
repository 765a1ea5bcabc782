"""Convolutional autoencoder side-information model (paper §5.1, "Autoencoder" row of Table 6).

The paper says only that encoder and decoder are convolutional and based on MobileNetV2, trained with an L2
reconstruction loss; ml-fct has no autoencoder. Our choice: a MobileNetV2 encoder (stem + inverted residuals, total
stride 32 by default) whose final feature map is flattened and linearly projected to ``embedding_dim`` — that
vector is the side-information ψ(x) — and a mirrored decoder (linear → feature map, then per stage a ×2
nearest-neighbour upsampling followed by inverted residuals, and a final 3×3 conv to RGB).

The bottleneck projection's width depends on the input resolution (a flattened h×w×C map), so an autoencoder is
tied to the image size it was initialised with.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fct_jax.losses import l2_normalize
from fct_jax.models.heads import torch_default_init
from fct_jax.models.mobilenet_v2 import ConvBNReLU6, InvertedResidual, conv_init, make_divisible

# (t, c, n, s) like MobileNetV2's table, shortened: the side-information model does not need 17 blocks.
AE_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 2))


def _upsample2(x):
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")


class Autoencoder(nn.Module):
  """Encoder ψ(x) ∈ R^embedding_dim and decoder x̂ = dec(ψ(x)).

  Attributes:
    embedding_dim: side-information width.
    num_classes: accepted so every registry model takes the same keywords; must be 0.
    settings: encoder inverted-residual settings (t, c, n, s); the decoder mirrors them.
    width_mult: channel multiplier.
    last_nonlin: ReLU on the side-information vector (off by default: an autoencoder code is signed).
    norm_feature: L2-normalise the side-information vector (the decoder sees the same vector).
    batch_norm: "fct" (closed-form gradient) or "flax"; the same variables and function (see ResNet).
    dtype: compute dtype; parameters float32.
  """
  embedding_dim: int = 128
  num_classes: int = 0
  settings: Sequence[Sequence[int]] = AE_SETTINGS
  width_mult: float = 1.0
  last_nonlin: bool = False
  norm_feature: bool = False
  batch_norm: str = "fct"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Encodes and reconstructs.

    Args:
      x: images [B, H, W, 3]; H and W divisible by the total stride (2 · product of the settings' strides).
      train: batch statistics for BatchNorm.

    Returns:
      dict with ``embedding`` [B, embedding_dim] float32 (the side-information), ``encoder_features``
      [B, H/S, W/S, C] and ``reconstruction`` [B, H, W, 3] float32 (regress it onto x with an L2 loss).
    """
    if self.num_classes:
      raise ValueError("the autoencoder has no classifier; use num_classes=0")
    stride = 2
    for _, _, _, s in self.settings:
      if s not in (1, 2):
        raise ValueError(f"autoencoder stage strides must be 1 or 2, got {s}")
      stride *= s
    b, h, w, _ = x.shape
    if h % stride or w % stride:
      raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's total stride {stride}")

    out = {}
    y = x.astype(self.dtype)
    block = functools.partial(InvertedResidual, batch_norm=self.batch_norm, dtype=self.dtype)
    y = ConvBNReLU6(make_divisible(32 * self.width_mult), strides=2, batch_norm=self.batch_norm, dtype=self.dtype,
                    name="enc_stem")(y, train)
    for i, (t, c, n, s) in enumerate(self.settings):
      for j in range(n):
        y = block(make_divisible(c * self.width_mult), strides=s if j == 0 else 1, expand_ratio=t,
                  name=f"enc{i}_{j}")(y, train)
    out["encoder_features"] = y
    fh, fw, fc = y.shape[1:]
    z = nn.Dense(self.embedding_dim, dtype=self.dtype, kernel_init=torch_default_init, name="enc_proj")(
        y.reshape(b, -1))
    z = z.astype(jnp.float32)
    if self.last_nonlin:
      z = nn.relu(z)
    if self.norm_feature:
      z = l2_normalize(z)
    out["embedding"] = z

    y = nn.Dense(fh * fw * fc, dtype=self.dtype, kernel_init=torch_default_init, name="dec_proj")(z.astype(self.dtype))
    y = y.reshape(b, fh, fw, fc)
    # Mirror the encoder: walk the settings backwards; each strided encoder stage becomes ×2 upsampling followed by
    # blocks producing the previous stage's width.
    widths = [make_divisible(32 * self.width_mult)] + [make_divisible(c * self.width_mult)
                                                       for _, c, _, _ in self.settings]
    for i in reversed(range(len(self.settings))):
      t, _, n, s = self.settings[i]
      if s == 2:
        y = _upsample2(y)
      for j in range(n):
        y = block(widths[i], strides=1, expand_ratio=t, name=f"dec{i}_{j}")(y, train)
    y = _upsample2(y)  # undo the stem's stride
    y = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, kernel_init=conv_init, name="dec_out")(y)
    out["reconstruction"] = y.astype(jnp.float32)
    return out
