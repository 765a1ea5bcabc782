"""The FCT transformation h(φ_old, ψ) ≈ φ_new (ml-fct: ``MLP_BN_SIDE_PROJECTION``).

Two projection branches lift the old embedding (d_old → 2·d_old → 2·d_new) and the side-information
(d_side → 2·d_side → 2·d_new); their concatenation (4·d_new) goes through a mixer (→ inner → inner → d_new).
Every layer is Dense + BatchNorm + ReLU except the mixer's last, which is a plain Dense.

ml-fct builds each layer as a 1×1 conv on [B, D, 1, 1] features with ``bias=normalizer is None``: the layers
followed by BatchNorm have no bias (BN's β replaces it) and only the final layer has one. With
(128, 128, 128, 2048) that is 5,712,000 parameters. With ml-fct's weights and BN statistics copied over, this
module and ml-fct's agreed to 1e-7 in eval mode (checked once by hand with PyTorch on a CPU).

FastFill (Jaeckle et al., ICLR 2023; ml-fct's ``MLP_BN_SIDE_PROJECTION_SIGMA``) adds an uncertainty head: a linear
layer (with bias) on h's output giving s = log σ² of width ``sigma_dim`` (1, or the embedding width). With
``sigma_dim=0`` (the default) the module is plain h: the same parameters and outputs as before the head existed.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fct_jax.models.heads import torch_default_bias_init, torch_default_init


class FCTTransformation(nn.Module):
  """h(old, side) → new embedding.

  Attributes:
    old_dim, side_dim, new_dim: widths of φ_old, ψ and φ_new. ``side_dim=0`` means "no side-information":
      the side branch is skipped and its half of the mixer input is zeros, so parameter shapes of the mixer are
      the same as with side-information. An all-zero side input with ``side_dim > 0`` also works (BN of a
      constant is zero). ml-fct: its "no side-info" run instead feeds the old embedding again as side-information
      (``side_info_model = old_model``); we follow the paper's ψ(x) = 0.
    inner_dim: mixer width (2048 in the paper).
    sigma_dim: width of FastFill's uncertainty head (0: none; else 1 or ``new_dim``).
    dtype: compute dtype; parameters float32.
  """
  old_dim: int
  side_dim: int
  new_dim: int
  inner_dim: int = 2048
  sigma_dim: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, old, side=None, train: bool = False):
    """Maps old embeddings (and side-information) to the new embedding space.

    Args:
      old: [B, old_dim] old embeddings.
      side: [B, side_dim] side-information, or None when ``side_dim == 0``.
      train: batch statistics for BatchNorm (ml-fct switches to eval mode for the second half of training;
        that schedule belongs to the stage).

    Returns:
      {"embedding": [B, new_dim] float32}, and with ``sigma_dim > 0`` also "log_var": [B, sigma_dim] float32, the
      predicted log σ² of each item's transformation error (FastFill).
    """
    # ml-fct: PyTorch's default init (U(±1/√fan_in)) for every layer, which this reproduces.
    def block(x, width, name):
      x = nn.Dense(width, use_bias=False, dtype=self.dtype, kernel_init=torch_default_init, name=f"{name}_dense")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name=f"{name}_bn")(x)
      return nn.relu(x)

    if old.shape[-1] != self.old_dim:
      raise ValueError(f"old embedding width {old.shape[-1]} != configured old_dim {self.old_dim}")
    p1 = block(block(old.astype(self.dtype), 2 * self.old_dim, "old_proj0"), 2 * self.new_dim, "old_proj1")
    if self.side_dim > 0:
      if side is None or side.shape[-1] != self.side_dim:
        got = None if side is None else side.shape[-1]
        raise ValueError(f"side-information width {got} != configured side_dim {self.side_dim}")
      p2 = block(block(side.astype(self.dtype), 2 * self.side_dim, "side_proj0"), 2 * self.new_dim, "side_proj1")
    else:
      p2 = jnp.zeros_like(p1)
    x = jnp.concatenate([p1, p2], axis=-1)
    x = block(x, self.inner_dim, "mix0")
    x = block(x, self.inner_dim, "mix1")
    x = nn.Dense(self.new_dim, dtype=self.dtype, kernel_init=torch_default_init,
                 bias_init=torch_default_bias_init(self.inner_dim), name="mix_out")(x)
    out = {"embedding": x.astype(jnp.float32)}
    if self.sigma_dim:
      if self.sigma_dim not in (1, self.new_dim):
        raise ValueError(f"sigma_dim must be 0, 1 or new_dim ({self.new_dim}), got {self.sigma_dim}")
      # ml-fct: nn.Linear(new_embedding_dim, sigma_dim), PyTorch's default init, on h's output.
      out["log_var"] = nn.Dense(self.sigma_dim, kernel_init=torch_default_init,
                                bias_init=torch_default_bias_init(self.new_dim), name="uncertainty")(
                                    out["embedding"])
    return out
