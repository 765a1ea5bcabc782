"""The paper datasets' transforms (ImageNet, Places, VGGFace2, CIFAR at 224): ml-fct's torchvision recipes on PIL.

Each crops and resizes with PIL's antialiased bilinear (:func:`resizing.resized_region`, part of the recipe) and
normalises with the dataset's :class:`~fct_jax.data.image_spec.ImageSpec` (``spec``, bound by the resolvers of
:mod:`fct_jax.data.augment`). Images arrive as encoded bytes (TFDS sources) or uint8 arrays (mock data).
"""

import numpy as np

from fct_jax.data import resizing
from fct_jax.data.image_spec import ImageSpec


def _input(img, spec: ImageSpec) -> np.ndarray:
  return spec.normalise(resizing.to_unit(img, "pil"))


def inception_crop_flip(example, rng: np.random.Generator, *, spec: ImageSpec, size: int = 224, scale=(0.08, 1.0),
                        ratio=(3.0 / 4.0, 4.0 / 3.0), draft: bool = True):
  """ImageNet training augmentation (ml-fct ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip``).

  Args:
    example: ``image`` as encoded bytes or uint8 [H, W, 3]; other fields pass through.
    rng: per-example generator (grain: seed + global position), so the crop is resume- and host-count-exact.
    spec: the dataset's normalisation.
    size: output side S.
  Returns:
    the example with ``image`` float32 [S, S, 3], normalised.
  """
  img = resizing.pil_open(example["image"])
  w, h = img.size
  box = resizing.random_resized_crop_box(rng, h, w, scale=tuple(scale), ratio=tuple(ratio))
  img = resizing.flip_pil(resizing.resized_region(img, box, size, size, draft=draft), rng)
  out = dict(example)
  out["image"] = _input(img, spec)
  return out


def resize_center_crop(example, *, spec: ImageSpec, resize: int = 256, crop: int = 224, draft: bool = True):
  """ImageNet evaluation: shorter side to ``resize``, centre ``crop`` (ml-fct ``Resize(256)``, ``CenterCrop(224)``).

  Done as one resize of the source region that maps onto the centre crop (same pixels as resize-then-crop up
  to rounding, and no full-size intermediate image).
  """
  img = resizing.pil_open(example["image"])
  w, h = img.size
  s = resize / min(w, h)
  rw, rh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)  # torchvision's rounding
  top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
  box = (top / s, left / s, crop / s, crop / s)
  img = resizing.resized_region(img, box, crop, crop, draft=draft)
  out = dict(example)
  out["image"] = _input(img, spec)
  return out


def resize_flip(example, rng=None, *, spec: ImageSpec, size: int = 224, flip: bool = True):
  """ml-fct's CIFAR-100 transforms: ``Resize(224)`` (+ ``RandomHorizontalFlip`` for training, when ``rng``).

  CIFAR images are square, so this is a resize to ``size × size``; other shapes are squashed to it (a batch needs
  one shape), where torchvision would keep the aspect ratio.
  """
  img = resizing.pil_open(example["image"])
  w, h = img.size
  img = resizing.resized_region(img, (0, 0, h, w), size, size, draft=False)
  if flip and rng is not None:
    img = resizing.flip_pil(img, rng)
  out = dict(example)
  out["image"] = _input(img, spec)
  return out


def face_box(bbox, width: int, height: int, *, extend: float = 0.3):
  """The loose face box ``(x, y, w, h)`` grown by ``extend`` (VGGFace2's protocol: 30% to include the head),
  clipped to the image; the whole image when the box is missing or degenerate. Returns ``(top, left, h, w)``."""
  x, y, bw, bh = (float(v) for v in np.asarray(bbox, np.float64).reshape(4))
  if not (np.isfinite([x, y, bw, bh]).all() and bw >= 2 and bh >= 2):
    return 0, 0, height, width
  cx, cy = x + bw / 2, y + bh / 2
  bw, bh = bw * (1 + extend), bh * (1 + extend)
  left, top = max(0.0, cx - bw / 2), max(0.0, cy - bh / 2)
  right, bottom = min(float(width), cx + bw / 2), min(float(height), cy + bh / 2)
  if right - left < 2 or bottom - top < 2:
    return 0, 0, height, width
  return top, left, bottom - top, right - left


def face_crop(example, rng=None, *, spec: ImageSpec, size: int = 224, resize: int = 256):
  """VGGFace2 (Cao et al. 2018): extended loose box, shorter side → ``resize``, then a ``size`` crop — random
  plus a horizontal flip for training (``rng`` given), central for evaluation. ``bbox`` is consumed.

  ml-fct has no VGGFace2 pipeline and the paper's appendix gives no face preprocessing; this is VGGFace2's own.
  """
  img = resizing.pil_open(example["image"])
  w, h = img.size
  top, left, bh, bw = face_box(example.get("bbox", np.zeros(4)), w, h)
  s = resize / min(bw, bh)
  rw, rh = max(size, int(round(bw * s))), max(size, int(round(bh * s)))
  if rng is not None:
    oy, ox = int(rng.integers(0, rh - size + 1)), int(rng.integers(0, rw - size + 1))
  else:
    oy, ox = (rh - size) // 2, (rw - size) // 2
  box = (top + oy / s, left + ox / s, size / s, size / s)
  img = resizing.resized_region(img, box, size, size)
  if rng is not None:
    img = resizing.flip_pil(img, rng)
  out = {k: v for k, v in example.items() if k != "bbox"}
  out["image"] = _input(img, spec)
  return out
