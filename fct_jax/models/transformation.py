"""The FCT transformation h(φ_old, ψ) ≈ φ_new (ml-fct: ``MLP_BN_SIDE_PROJECTION``).

Two projection branches lift the old embedding (d_old → 2·d_old → 2·d_new) and the side-information
(d_side → 2·d_side → 2·d_new); their concatenation (4·d_new) goes through a mixer (→ inner → inner → d_new).
Every layer is Dense + BatchNorm + ReLU except the mixer's last, which is a plain Dense.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class FCTTransformation(nn.Module):
  """h(old, side) → new embedding.

  Attributes:
    old_dim, side_dim, new_dim: widths of φ_old, ψ and φ_new. ``side_dim=0`` means "no side-information":
      the side branch is skipped and its half of the mixer input is zeros, so parameter shapes of the mixer are
      the same as with side-information.
    inner_dim: mixer width (2048 in the paper).
  """
  old_dim: int
  side_dim: int
  new_dim: int
  inner_dim: int = 2048
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, old, side=None, train: bool = False):
    """Args: old [B, old_dim]; side [B, side_dim] or None. Returns {"embedding": [B, new_dim]}."""
    def block(x, width, name):
      x = nn.Dense(width, dtype=self.dtype, name=f"{name}_dense")(x)
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
    x = nn.Dense(self.new_dim, dtype=self.dtype, name="mix_out")(x)
    return {"embedding": x.astype(jnp.float32)}
