"""MobileNetV2 (Sandler et al. 2018) with the backbone output contract — the paper's "MobileNet-128" old model.

ml-fct has no MobileNet; we follow torchvision's MobileNetV2 and build the embedding the way ml-fct's ResNets do:
the final 1×1 conv (1280 channels in torchvision) outputs ``embedding_dim`` channels, then BN, then ReLU6 when
``last_nonlin`` (MobileNetV2's activation), then global average pooling → the embedding; a bias-free linear
classifier follows. With ``embedding_dim=None, classifier_bias=True`` the parameters are torchvision's
(3,504,872 for 1000 classes). ml-fct-style deviations from torchvision: no dropout before the classifier (keeps the
step RNG-free; the paper's recipe does not mention it). Convs are initialised as in torchvision (He normal,
fan-out); the classifier like ml-fct's (PyTorch default).

The inverted-residual block is shared with the autoencoder (``autoencoder.py``).
"""

import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from fct_jax.losses import l2_normalize
from fct_jax.models.batch_norm import batch_norm_layer
from fct_jax.models.heads import make_classifier

_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1.
_BN_EPS = 1e-5
# torchvision's MobileNetV2 init: He normal with fan-out for convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# (expansion t, output channels c, repeats n, first stride s), the MobileNetV2 paper's Table 2.
DEFAULT_SETTINGS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of ``divisor`` without dropping more than 10% (MobileNet convention)."""
  rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * v else rounded


def _norm(kind: str, train: bool, dtype: Any, name: str):
  # No axis_name: under one jit with a batch sharded on 'data' the statistics are already global.
  return batch_norm_layer(kind, use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, dtype=dtype,
                          name=name)()


class ConvBNReLU6(nn.Module):
  """Conv (no bias) + BatchNorm (``batch_norm``: "fct" or "flax", see ResNet) + optional ReLU6."""
  features: int
  kernel: int = 3
  strides: int = 1
  groups: int = 1
  activation: bool = True
  batch_norm: str = "fct"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    p = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.strides, self.strides), padding=((p, p), (p, p)),
                feature_group_count=self.groups, use_bias=False, dtype=self.dtype, kernel_init=conv_init,
                name="conv")(x)
    x = _norm(self.batch_norm, train, self.dtype, "bn")(x)
    return nn.relu6(x) if self.activation else x


class InvertedResidual(nn.Module):
  """Expand (1×1) → depthwise 3×3 (strided) → linear project (1×1); identity shortcut when shapes allow.

  Attributes:
    features: output channels.
    strides: depthwise stride.
    expand_ratio: hidden width = round(in_channels · expand_ratio); 1 skips the expansion conv.
    batch_norm: "fct" or "flax" (see ResNet).
  """
  features: int
  strides: int = 1
  expand_ratio: int = 6
  batch_norm: str = "fct"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_ch = x.shape[-1]
    hidden = int(round(in_ch * self.expand_ratio))
    conv_bn = functools.partial(ConvBNReLU6, batch_norm=self.batch_norm, dtype=self.dtype)
    y = x
    if self.expand_ratio != 1:
      y = conv_bn(hidden, kernel=1, name="expand")(y, train)
    y = conv_bn(hidden, kernel=3, strides=self.strides, groups=hidden, name="depthwise")(y, train)
    y = conv_bn(self.features, kernel=1, activation=False, name="project")(y, train)
    if self.strides == 1 and in_ch == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 backbone returning a dict of named outputs.

  Attributes:
    num_classes: classifier width; 0 means no classifier.
    embedding_dim: width of the final 1×1 conv = the embedding; None → torchvision's 1280·max(1, width_mult).
    last_nonlin: ReLU6 on the embedding conv's output.
    norm_feature: L2-normalise the embedding.
    width_mult: channel multiplier (rounded to multiples of 8).
    settings: inverted-residual settings (t, c, n, s); smaller tuples give tiny test variants.
    cifar_stem: stride-1 stem conv for 32×32 inputs (our addition, like the ResNets').
    head: "linear" or "arcface".
    classifier_bias: torchvision's biased classifier (parameter-count tests only).
    batch_norm: "fct" (closed-form gradient) or "flax"; the same variables and function (see ResNet).
    dtype: compute dtype; parameters float32.
  """
  num_classes: int = 1000
  embedding_dim: Optional[int] = None
  last_nonlin: bool = True
  norm_feature: bool = False
  width_mult: float = 1.0
  settings: Sequence[Sequence[int]] = DEFAULT_SETTINGS
  cifar_stem: bool = False
  head: str = "linear"
  classifier_bias: bool = False
  batch_norm: str = "fct"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Runs the backbone.

    Args:
      x: images [B, H, W, 3] (NHWC).
      train: use batch statistics and update ``batch_stats``.

    Returns:
      dict with ``stem``, ``stage{i}`` (output of each settings row), ``features`` (the final 1×1 conv's map),
      ``embedding`` [B, embedding_dim] float32 and ``logits`` [B, num_classes] float32 when num_classes > 0.
    """
    block = functools.partial(InvertedResidual, batch_norm=self.batch_norm, dtype=self.dtype)
    conv_bn = functools.partial(ConvBNReLU6, batch_norm=self.batch_norm, dtype=self.dtype)
    out = {}
    x = x.astype(self.dtype)
    stem_ch = make_divisible(32 * self.width_mult)
    x = conv_bn(stem_ch, kernel=3, strides=1 if self.cifar_stem else 2, name="stem")(x, train)
    out["stem"] = x
    for i, (t, c, n, s) in enumerate(self.settings):
      ch = make_divisible(c * self.width_mult)
      for j in range(n):
        x = block(ch, strides=s if j == 0 else 1, expand_ratio=t, name=f"stage{i}_{j}")(x, train)
      out[f"stage{i}"] = x
    embedding_dim = self.embedding_dim or make_divisible(1280 * max(1.0, self.width_mult))
    x = conv_bn(embedding_dim, kernel=1, activation=self.last_nonlin, name="last_conv")(x, train)
    out["features"] = x
    emb = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.norm_feature:
      emb = l2_normalize(emb)
    out["embedding"] = emb
    if self.num_classes:
      out["logits"] = make_classifier(self.head, self.num_classes, self.classifier_bias, self.dtype)(emb)
    return out
