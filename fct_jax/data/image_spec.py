"""How a dataset's images become network inputs: the normalisation and the resize method, one spec per dataset.

Every transform (training, evaluation, SimCLR's views, the transformation stage's cached views) takes its spec from
the dataset (:func:`fct_jax.data.sources.get_image_spec`), so a model is trained and applied on the same input
distribution: ψ's SimCLR views are normalised and resized exactly as the evaluation images it later embeds.

Two resize methods exist because the datasets come in two kinds (see :mod:`fct_jax.data.resizing`): ``"numpy"``
bilinear for the tiny in-memory arrays (shapes, digits; fast, and the demo's results depend on its exact bits) and
``"pil"`` antialiased bilinear for decoded photos (the paper's TFDS datasets; torchvision's resize on PIL images,
as in ml-fct, which matters when a 500-pixel photo shrinks to 224).
"""

import dataclasses
from typing import Tuple

import numpy as np

RESIZE_METHODS = ("numpy", "pil")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """A dataset's input convention.

  Attributes:
    mean, std: per-channel normalisation of pixels in [0, 1]: the network sees ``(x − mean) / std``.
    resize: ``"numpy"`` or ``"pil"``: how transforms that may use either (SimCLR's views) crop and resize.
  """
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  resize: str

  def __post_init__(self):
    if self.resize not in RESIZE_METHODS:
      raise ValueError(f"unknown resize method {self.resize!r}; valid: {', '.join(RESIZE_METHODS)}")

  def normalise(self, unit: np.ndarray) -> np.ndarray:
    """A float image [H, W, 3] in [0, 1] → the network input ``(x − mean) / std``, float32.

    The one normalisation of every transform.
    """
    out = (unit - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return np.asarray(out, np.float32)


# The in-memory datasets (the shapes demo, scikit-learn's digits): a fixed mid-grey centre and spread.
SMALL_ARRAYS = ImageSpec(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="numpy")
# The paper's photo datasets: ml-fct's Normalize (torchvision's ImageNet values) and PIL resizing.
PHOTOS = ImageSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize="pil")
