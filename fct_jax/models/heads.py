"""Heads on top of an embedding: linear classifier, ArcFace cosine classifier, SimCLR projection MLP.

Both classifiers keep their weight as a single parameter ``kernel`` of shape [D, C], so every backbone stores its
classifier at ``params["classifier"]["kernel"]`` whatever the head kind — the BCT influence loss and the
old-classifier extension read it from there.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fct_jax.losses import cosine_logits

# ml-fct builds every layer with PyTorch's default initialisation (kaiming_uniform with a=√5, i.e.
# U(±1/√fan_in) for weights); this is the same distribution expressed as a Flax initializer.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias initialisation, U(±1/√fan_in)."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class LinearClassifier(nn.Module):
  """Linear classifier on the embedding.

  ml-fct: a bias-free 1×1 conv on the pooled feature, i.e. a bias-free linear layer; ``use_bias=True`` gives
  torchvision's ``fc`` (used only to match torchvision's parameter counts).

  Attributes:
    num_classes: C.
    use_bias: add a bias vector.
    dtype: compute dtype; the kernel stays float32.
  """
  num_classes: int
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Args: x: [B, D]. Returns: logits [B, C] float32."""
    kernel = self.param("kernel", torch_default_init, (x.shape[-1], self.num_classes), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", torch_default_bias_init(x.shape[-1]), (self.num_classes,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y.astype(jnp.float32)


class ArcFaceHead(nn.Module):
  """ArcFace classifier (Deng et al. 2019): cosines between the normalised embedding and normalised class weights.

  The additive angular margin and the scale belong to the loss (``losses.arcface_loss``), so the head's output
  is also what evaluation ranks by (argmax cosine = predicted class).

  Attributes:
    num_classes: C.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x):
    """Args: x: [B, D]. Returns: cosines [B, C] float32 in [-1, 1]."""
    # Always float32: cosines near ±1 feed arccos-like terms in the loss, where bf16 rounding is harmful.
    kernel = self.param("kernel", nn.initializers.xavier_normal(), (x.shape[-1], self.num_classes), jnp.float32)
    return cosine_logits(x, kernel)


def make_classifier(head: str, num_classes: int, use_bias: bool, dtype: Any, name: str = "classifier"):
  """Builds the classifier head named ``name`` of kind ``head`` ('linear' or 'arcface')."""
  if head == "linear":
    return LinearClassifier(num_classes, use_bias=use_bias, dtype=dtype, name=name)
  if head == "arcface":
    if use_bias:
      raise ValueError("the ArcFace head has no bias")
    return ArcFaceHead(num_classes, name=name)
  raise ValueError(f"unknown head {head!r}; valid heads: arcface, linear")


class SimCLRProjection(nn.Module):
  """SimCLR projection MLP g(·) applied to the backbone embedding during contrastive training only.

  Hidden layers are Dense (no bias) + BatchNorm + ReLU, the last is a plain Dense, the layout of the FCT MLP and of
  SimCLR's improved recipe (BN in the projection head). The side-information ψ(x) stored in the gallery is the
  backbone embedding *before* this head, as in SimCLR.

  Attributes:
    hidden_dim: width of the hidden layers.
    out_dim: width of the projection z, where the NT-Xent loss is computed.
    num_layers: number of Dense layers (≥ 1).
    dtype: compute dtype.
  """
  hidden_dim: int = 2048
  out_dim: int = 128
  num_layers: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Args: x: [B, D]. Returns: z [B, out_dim] float32 (not normalised; the loss normalises)."""
    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, kernel_init=torch_default_init,
                   name=f"dense{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=torch_default_init,
                 name=f"dense{self.num_layers - 1}")(x)
    return x.astype(jnp.float32)
