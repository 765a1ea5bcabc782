"""Linear Centered Kernel Alignment (Kornblith et al., ICML 2019), as in the paper's Table 6 (old features vs
side-information over the gallery set).

Computed in feature space (d_x × d_y cross-covariances, never the N×N Gram matrices) in float64 on the host:
O(N · d_x · d_y) time, O(d_x · d_y) memory, so the full ImageNet validation set (N = 50k) takes well under a second.
"""

from __future__ import annotations

import numpy as np


def _centered(x, name: str) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 2 or a.shape[0] == 0:
    raise ValueError(f"{name} must be a non-empty 2-D (N, d) array, got shape {a.shape}")
  if not np.isfinite(a).all():
    raise ValueError(f"{name} contains NaN or inf")
  return a - a.mean(axis=0, keepdims=True)


def _debias(xty_sq, rows_x, rows_y, norm_x, norm_y, n):
  # Unbiased HSIC (Song et al., 2012) of linear kernels, up to the factor 1/(n(n-3)) that cancels in CKA:
  # tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1 with K̃ = K minus its diagonal, written with feature-space
  # sums (rows_x[i] = |x_i|², norm_x = Σ rows_x).
  return xty_sq - n / (n - 2.0) * rows_x.dot(rows_y) + norm_x * norm_y / ((n - 1.0) * (n - 2.0))


def linear_cka(x, y, *, debiased: bool = False) -> float:
  """Linear CKA between two representations of the same N examples.

  Args:
    x: (N, d_x) features (e.g. φ_old over the gallery).
    y: (N, d_y) features of the same examples (e.g. side-information ψ).
    debiased: use the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021), which removes the
      upward bias of CKA at small N relative to d. Needs N ≥ 4.

  Returns:
    CKA in [0, 1] (the debiased estimate may be slightly negative), a python float. If one representation is
    constant (e.g. the "no side-information" zero vector) CKA is defined as 0.

  Raises:
    ValueError: shapes differ in N, empty or non-finite inputs, or N < 4 with debiased=True.
  """
  xc, yc = _centered(x, "x"), _centered(y, "y")
  if xc.shape[0] != yc.shape[0]:
    raise ValueError(f"x and y must have the same number of rows, got {xc.shape[0]} and {yc.shape[0]}")
  n = xc.shape[0]
  xty = np.linalg.norm(xc.T @ yc) ** 2
  xtx = np.linalg.norm(xc.T @ xc) ** 2
  yty = np.linalg.norm(yc.T @ yc) ** 2
  if debiased:
    if n < 4:
      raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    rx, ry = np.einsum("ij,ij->i", xc, xc), np.einsum("ij,ij->i", yc, yc)
    nx, ny = rx.sum(), ry.sum()
    xty = _debias(xty, rx, ry, nx, ny, n)
    xtx = _debias(xtx, rx, rx, nx, nx, n)
    yty = _debias(yty, ry, ry, ny, ny, n)
  denom = np.sqrt(max(xtx, 0.0) * max(yty, 0.0))
  if denom == 0.0:
    return 0.0
  return float(xty / denom)
