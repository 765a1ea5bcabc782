"""ResNet family with ml-fct's embedding construction (ResNet18/34/50/101, WideResNet50-2/101-2).

Blocks are standard v1.5 (stride on the 3×3 conv). The difference from torchvision is where the embedding comes
from: the *last block of layer4* outputs ``embedding_dim`` channels (for a bottleneck its conv3; for a basic block
both of its convs, as in ml-fct) with a 1×1 conv + BN shortcut when the width changes, then ReLU when
``last_nonlin``, then global average pooling → the embedding (non-negative, not L2-normalised unless
``norm_feature``). The classifier is a bias-free linear layer on the embedding. With ``embedding_dim=None`` the
network is exactly torchvision's (and with ``classifier_bias=True`` so are its parameter counts).

Layout is NHWC; padding is explicit and symmetric like PyTorch's (Flax's 'SAME' pads stride-2 convs asymmetrically),
so weights ported from PyTorch give the same numbers: ml-fct's ResNet18-32 and ResNet50-32 with random weights and
BN statistics, copied over (OIHW → HWIO), agreed with these modules to 1e-6 in eval mode (checked once by hand with
PyTorch on a CPU; CI has no torch).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fct_jax.losses import l2_normalize
from fct_jax.models.batch_norm import batch_norm_layer
from fct_jax.models.heads import make_classifier, torch_default_init

# BatchNorm as in PyTorch: momentum 0.1 there is 0.9 here (Flax weights the *old* statistics), eps 1e-5.
# No axis_name: batches are global jax.Arrays sharded on the mesh's 'data' axis and the step is one jit, so the
# mean/variance reductions XLA emits already span every device — statistics are global, like SyncBN.
_BN_MOMENTUM = 0.9
_BN_EPS = 1e-5


def _pad(k: int):
  return ((k // 2, k // 2), (k // 2, k // 2))


class SpaceToDepthStem(nn.Module):
  """The ImageNet stem conv (7×7, stride 2, padding 3, no bias) computed as a 4×4 stride-1 conv on a 2×2
  space-to-depth rearrangement of the image — the same function and the same ``kernel`` variable as ``nn.Conv``.

  Why: a 3-channel input fits tensor cores badly. In an H100 profile of the ResNet-50 step (batch 256, bf16), the
  kernels that fit the direct stem conv — cuDNN padding the image to 8 channels, then an sm80-era "align8" kernel —
  took ~2 ms of the 44 ms step. Here the image, padded by 3 (to an even size) and to 4 channels, becomes
  [B, ⌈H/2⌉ + 3, ⌈W/2⌉ + 3, 16], and the 7×7×3 kernel, zero-padded to 8×8×4, becomes 4×4×16: a conv with 16 input
  channels and K = 256 multiply-adds per output (cuDNN's padded 7×7×8 does 392). The idea is MLPerf's ResNet-50
  stem on TPUs; the rearrangement is exact (only the summation order differs).

  Attributes:
    features: output channels.
    kernel_init: initialiser of the [7, 7, C, features] kernel (the same call ``nn.Conv`` makes).
    dtype: compute dtype; the kernel is stored float32.
  """
  features: int
  kernel_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = self.param("kernel", self.kernel_init, (7, 7, c, self.features), jnp.float32)
    cp = -(-c // 4) * 4  # channels padded to a multiple of 4, so the rearranged input has a multiple of 16
    # Pad 3 on each side (PyTorch's padding) plus one row/column where needed for an even size; the extra row and
    # column only ever meet the kernel's zero-padded 8th tap.
    hp, wp = h + 6 + (h % 2), w + 6 + (w % 2)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (3, hp - h - 3), (3, wp - w - 3), (0, cp - c)))
    x = x.reshape(b, hp // 2, 2, wp // 2, 2, cp).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp // 2, wp // 2, 4 * cp)
    # Tap (u, v) = (2a + p, 2b + q) of the 8×8 kernel meets input channel (p, q, c) at offset (a, b).
    k = jnp.pad(kernel.astype(self.dtype), ((0, 1), (0, 1), (0, cp - c), (0, 0)))
    k = k.reshape(4, 2, 4, 2, cp, self.features).transpose(0, 2, 1, 3, 4, 5).reshape(4, 4, 4 * cp, self.features)
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# How the ImageNet stem's 7×7 stride-2 conv is computed: the same function and variables either way.
STEM_CONVS = ("direct", "space_to_depth")


class BasicBlock(nn.Module):
  """3×3 → 3×3 residual block (ResNet18/34).

  Attributes:
    planes: nominal width of the block.
    out_dim: output channels. ml-fct: when the block carries the embedding, *both* convs take this width
      (``planes = embedding_dim``); elsewhere ``out_dim == planes``.
    strides: stride of the first conv.
    nonlin: ReLU after the residual sum (False only for the embedding block with ``last_nonlin=False``).
  """
  planes: int
  out_dim: int
  strides: int = 1
  nonlin: bool = True
  conv: Any = None
  norm: Any = None

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.out_dim, (3, 3), (self.strides, self.strides), padding=_pad(3), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.out_dim, (3, 3), padding=_pad(3), name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.out_dim:
      residual = self.conv(self.out_dim, (1, 1), (self.strides, self.strides), padding="VALID",
                           name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual)
    y = y + residual
    return nn.relu(y) if self.nonlin else y


class Bottleneck(nn.Module):
  """1×1 → 3×3 (strided, v1.5) → 1×1 bottleneck block (ResNet50/101, wide variants).

  Attributes:
    planes: nominal width; the inner width is ``planes * base_width // 64``.
    out_dim: output channels of conv3 (``4 * planes``, or ``embedding_dim`` for the embedding block).
    strides: stride of the 3×3 conv.
    base_width: 64 standard, 128 for WideResNet-*-2.
    nonlin: ReLU after the residual sum.
  """
  planes: int
  out_dim: int
  strides: int = 1
  base_width: int = 64
  nonlin: bool = True
  conv: Any = None
  norm: Any = None

  @nn.compact
  def __call__(self, x):
    width = self.planes * self.base_width // 64
    residual = x
    y = self.conv(width, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(width, (3, 3), (self.strides, self.strides), padding=_pad(3), name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.out_dim, (1, 1), padding="VALID", name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.strides != 1 or x.shape[-1] != self.out_dim:
      residual = self.conv(self.out_dim, (1, 1), (self.strides, self.strides), padding="VALID",
                           name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual)
    y = y + residual
    return nn.relu(y) if self.nonlin else y


class ResNet(nn.Module):
  """ResNet backbone returning a dict of named outputs.

  Attributes:
    num_classes: classifier width; 0 means no classifier (``logits`` absent).
    embedding_dim: embedding width built into layer4's last block; None → 512·expansion (torchvision's network).
    stage_sizes: blocks per layer, e.g. (3, 4, 6, 3) for ResNet50.
    block: "bottleneck" or "basic".
    last_nonlin: ReLU on the embedding block's output (ml-fct ``last_nonlin``).
    norm_feature: L2-normalise the embedding (ml-fct ``norm_feature``); the classifier then sees the unit vector.
    width: stem channels and layer1 planes (64 standard; small values give tiny test variants).
    base_width: 64, or 128 for wide ResNets.
    cifar_stem: 3×3 stride-1 stem conv and no max-pool, for 32×32 inputs. ml-fct: not in ml-fct, which resizes
      CIFAR-100 to 224 and keeps the ImageNet stem; this is our addition for fast CIFAR runs.
    head: classifier kind, "linear" (ml-fct) or "arcface" (VGGFace2 experiments; ``logits`` are then cosines).
    classifier_bias: linear classifier with a bias (torchvision ``fc``); ml-fct's is bias-free.
    batch_norm: "fct" (`fct_jax.models.batch_norm.BatchNorm`: a closed-form gradient, faster train steps on GPUs)
      or "flax" (``flax.linen.BatchNorm``). The same variables and the same function either way.
    stem_conv: "direct" (``nn.Conv``) or "space_to_depth" (`SpaceToDepthStem`) for the ImageNet stem's 7×7 conv;
      the same variables and the same function either way (unused with ``cifar_stem``).
    dtype: compute dtype (bfloat16 on accelerators); parameters and BN statistics stay float32.
  """
  num_classes: int = 1000
  embedding_dim: Optional[int] = None
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  last_nonlin: bool = True
  norm_feature: bool = False
  width: int = 64
  base_width: int = 64
  cifar_stem: bool = False
  head: str = "linear"
  classifier_bias: bool = False
  batch_norm: str = "fct"
  stem_conv: str = "direct"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Runs the backbone.

    Args:
      x: images [B, H, W, 3] (NHWC), normalised floats.
      train: batch statistics (and their running-average update in ``batch_stats``) instead of running averages.

    Returns:
      dict with ``stem`` [B, H/4, W/4, width], ``layer1``..``layer4`` feature maps (compute dtype),
      ``embedding`` [B, embedding_dim] float32 and, when ``num_classes > 0``, ``logits`` [B, num_classes] float32.
    """
    if self.block == "bottleneck":
      block_cls, expansion = functools.partial(Bottleneck, base_width=self.base_width), 4
    elif self.block == "basic":
      if self.base_width != 64:
        raise ValueError("base_width > 64 is not supported by BasicBlock (as in ml-fct)")
      block_cls, expansion = BasicBlock, 1
    else:
      raise ValueError(f"unknown block {self.block!r}; valid blocks: basic, bottleneck")
    # ml-fct: no explicit init, so PyTorch's defaults: convs U(±1/√fan_in), BN γ=1, β=0.
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=torch_default_init)
    norm = batch_norm_layer(self.batch_norm, use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPS,
                            dtype=self.dtype)
    final_planes = self.width * 2 ** (len(self.stage_sizes) - 1)
    embedding_dim = self.embedding_dim or final_planes * expansion

    if self.stem_conv not in STEM_CONVS:
      raise ValueError(f"unknown stem_conv {self.stem_conv!r}; valid: {', '.join(STEM_CONVS)}")

    out = {}
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv(self.width, (3, 3), padding=_pad(3), name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
    else:
      if self.stem_conv == "space_to_depth":
        x = SpaceToDepthStem(self.width, torch_default_init, self.dtype, name="conv1")(x)
      else:
        x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    out["stem"] = x

    num_layers = len(self.stage_sizes)
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2 ** i
      is_last_layer = i == num_layers - 1
      for j in range(num_blocks):
        is_embedding_block = is_last_layer and j == num_blocks - 1
        x = block_cls(
            planes=planes,
            out_dim=embedding_dim if is_embedding_block else planes * expansion,
            strides=2 if (i > 0 and j == 0) else 1,
            nonlin=self.last_nonlin if is_embedding_block else True,
            conv=conv, norm=norm, name=f"layer{i + 1}_{j}")(x)
      out[f"layer{i + 1}"] = x

    # Pool in float32: the convert fuses into the reduction, and the embedding is what retrieval stores.
    emb = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.norm_feature:
      emb = l2_normalize(emb)
    out["embedding"] = emb
    if self.num_classes:
      out["logits"] = make_classifier(self.head, self.num_classes, self.classifier_bias, self.dtype)(emb)
    return out


# Registry constructors. ml-fct: its ResNet101 passes a misspelled ``eembedding_dim`` and so silently ignores the
# requested embedding width (always 2048); ours honours ``embedding_dim``.
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck")
WideResNet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck", base_width=128)
WideResNet101_2 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck", base_width=128)
