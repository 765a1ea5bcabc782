"""A small CNN backbone for the embedded demo data and for tests.

It follows the same output contract as the paper's backbones: a dict with ``embedding`` (after an optional final
ReLU, global-average-pooled, like ml-fct's ResNets) and ``logits`` from a bias-free linear classifier — or, with
``head="arcface"``, the cosines of an ``ArcFaceHead`` (the ArcFace runlocal forms).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fct_jax.models.heads import make_classifier


class SmallCNN(nn.Module):
  """Conv-BN-ReLU stages with stride-2 downsampling, then a projection to ``embedding_dim``.

  Attributes:
    num_classes: classifier width; 0 disables the classifier (``logits`` absent).
    embedding_dim: width of the embedding.
    widths: channels per stage; each stage halves the resolution except the first.
    stem_stride: stride of the first stage (2 quarters the compute on 32×32 demo images).
    last_nonlin: ReLU after the embedding projection (ml-fct's ``last_nonlin``).
    norm_feature: L2-normalise the embedding before the classifier.
    head: classifier kind, "linear" or "arcface" (``logits`` are then cosines).
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int
  embedding_dim: int = 32
  widths: Sequence[int] = (16, 32, 64)
  stem_stride: int = 1
  last_nonlin: bool = True
  norm_feature: bool = False
  head: str = "linear"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Args: x: images [B, H, W, 3], float in [0, 1] or normalised. Returns dict of named outputs."""
    out = {}
    x = x.astype(self.dtype)
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name=name)
    for i, w in enumerate(self.widths):
      stride = self.stem_stride if i == 0 else 2
      x = nn.Conv(w, (3, 3), strides=stride, use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(bn(f"bn{i}")(x))
      out[f"stage{i}"] = x
    # ml-fct builds the embedding into the last conv block, then ReLU, then global average pooling.
    x = nn.Conv(self.embedding_dim, (1, 1), use_bias=False, dtype=self.dtype, name="proj")(x)
    x = bn("proj_bn")(x)
    if self.last_nonlin:
      x = nn.relu(x)
    emb = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    if self.norm_feature:
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    out["embedding"] = emb
    if self.num_classes and self.head != "linear":
      out["logits"] = make_classifier(self.head, self.num_classes, False, self.dtype)(emb)
    elif self.num_classes:
      # Flax's Dense (lecun_normal init), kept as it was so that linear-head runs do not change.
      out["logits"] = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                               name="classifier")(emb).astype(jnp.float32)
    return out
