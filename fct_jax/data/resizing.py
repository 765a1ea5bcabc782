"""Crop boxes and the two ways to crop-and-resize an image; each dataset picks one (its ``ImageSpec.resize``).

``numpy`` (:func:`resize_bilinear`, :func:`rotated_crop_bilinear`): plain bilinear sampling of a uint8 array
turned float, no antialiasing. The in-memory datasets (shapes, digits) are a few dozen pixels wide and shrink
little, so aliasing does not matter there; it is fast, supports rotated crops, and the demo's published results
depend on its exact bits.

``pil`` (:func:`resized_region`): PIL's bilinear filter, antialiased when shrinking (what torchvision does on PIL
images, hence ml-fct's pipelines), read straight from the encoded bytes with JPEG draft decoding. The paper's
photos shrink several-fold to 224 pixels, where a non-antialiased resize would alias visibly.
"""

import io

import numpy as np
from PIL import Image


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, *,
                            scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), attempts: int = 10):
  """A crop box ``(top, left, h, w)`` as torchvision's ``RandomResizedCrop`` samples it.

  Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); up to ``attempts`` tries to fit, then the centre
  crop clamped to ``ratio`` (torchvision's fallback).
  """
  area = height * width
  log_r = np.log(np.asarray(ratio, np.float64))
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    r = np.exp(rng.uniform(log_r[0], log_r[1]))
    w = int(round(np.sqrt(target * r)))
    h = int(round(np.sqrt(target / r)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def to_unit(pixels, method: str) -> np.ndarray:
  """uint8 pixels (array or PIL image) → float32 in [0, 1], as the ``method``'s transforms have always computed it.

  numpy divides by 255, pil multiplies by 1/255: the two differ in the last bit for about half the grey levels,
  and each is kept so that existing results stay bit-identical.
  """
  if method == "pil":
    return np.asarray(pixels, np.float32) * (1.0 / 255.0)
  return np.asarray(pixels).astype(np.float32) / 255.0


# ------------------------------------------------------------------------------------------------------ numpy


def resize_bilinear(img: np.ndarray, box, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize of the crop ``box = (top, left, h, w)`` of ``img`` [H, W, C] float to [out_h, out_w, C].

  Sample points are pixel centres (``align_corners=False``, as torchvision), clamped at the crop's border.
  """
  top, left, h, w = box
  ys = np.clip((np.arange(out_h, dtype=np.float32) + 0.5) * (h / out_h) - 0.5, 0, h - 1) + top
  xs = np.clip((np.arange(out_w, dtype=np.float32) + 0.5) * (w / out_w) - 0.5, 0, w - 1) + left
  y0 = np.floor(ys).astype(np.int64)
  x0 = np.floor(xs).astype(np.int64)
  y1 = np.minimum(y0 + 1, top + h - 1)
  x1 = np.minimum(x0 + 1, left + w - 1)
  wy = (ys - y0)[:, None, None]
  wx = (xs - x0)[None, :, None]
  rows0, rows1 = img[y0], img[y1]
  top_row = rows0[:, x0] * (1 - wx) + rows0[:, x1] * wx
  bottom_row = rows1[:, x0] * (1 - wx) + rows1[:, x1] * wx
  return top_row * (1 - wy) + bottom_row * wy


def rotated_crop_bilinear(img: np.ndarray, box, angle: float, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear sample of the crop ``box = (top, left, h, w)`` of ``img`` [H, W, C] rotated by ``angle`` radians
  about the crop's centre, to [out_h, out_w, C]; points outside the image take the nearest edge pixel."""
  top, left, h, w = box
  v = ((np.arange(out_h, dtype=np.float32) + 0.5) / out_h - 0.5)[:, None] * h
  u = ((np.arange(out_w, dtype=np.float32) + 0.5) / out_w - 0.5)[None, :] * w
  c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
  ys = np.clip(top + h / 2 - 0.5 + s * u + c * v, 0, img.shape[0] - 1)
  xs = np.clip(left + w / 2 - 0.5 + c * u - s * v, 0, img.shape[1] - 1)
  y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
  y1, x1 = np.minimum(y0 + 1, img.shape[0] - 1), np.minimum(x0 + 1, img.shape[1] - 1)
  wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
  return ((img[y0, x0] * (1 - wx) + img[y0, x1] * wx) * (1 - wy)
          + (img[y1, x0] * (1 - wx) + img[y1, x1] * wx) * wy)


# -------------------------------------------------------------------------------------------------------- PIL
# Images arrive as encoded bytes (TFDS sources) or uint8 arrays (mock data, in-memory sources).


def pil_open(image):
  """A lazily decoded PIL image from encoded bytes, or a PIL image of a uint8 array [H, W, 3] (PIL passes)."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
    return Image.open(io.BytesIO(bytes(image)))  # reads the header only; pixels are decoded on first use
  return Image.fromarray(np.asarray(image, np.uint8))


def pil_rgb(image):
  """A fully decoded RGB PIL image (for several regions of one image, where a draft decode would fit only one)."""
  img = pil_open(image)
  return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(image) -> np.ndarray:
  """uint8 [H, W, 3] from encoded bytes (TFDS sources) or an array (passed through): for numpy-only transforms."""
  if isinstance(image, np.ndarray):
    return image
  return np.asarray(pil_rgb(image))


def _draft(img, scale: float):
  """Lets a JPEG decode at reduced size (DCT scaling, 1/2–1/8) when the result is shrunk by ``scale`` < 1 anyway.

  PIL picks the smallest scale whose size is still at least the requested one, so the region resized afterwards
  keeps at least its output size: the output is a (slightly different) bilinear downsample of the same region,
  several times cheaper to decode. No-op for other formats and for arrays.
  """
  if scale < 1.0 and getattr(img, "format", None) == "JPEG":
    w, h = img.size
    img.draft("RGB", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))


def resized_region(img, box, out_h: int, out_w: int, *, draft: bool = True):
  """PIL bilinear (antialiased, as torchvision on PIL images) resize of ``box = (top, left, h, w)`` — in the
  coordinates of the undecoded image ``img`` — to ``[out_h, out_w]``; returns an RGB PIL image."""
  w0, h0 = img.size
  top, left, h, w = box
  if draft:
    _draft(img, max(out_h / max(h, 1), out_w / max(w, 1)))
  if img.mode != "RGB":
    img = img.convert("RGB")
  sx, sy = img.size[0] / w0, img.size[1] / h0  # < 1 after a draft decode
  # Clamp: boxes computed in float (e.g. face_crop's rounding of the resized size) can overshoot the image by a
  # fraction of a pixel, which PIL refuses.
  iw, ih = img.size
  region = (min(max(left * sx, 0.0), iw), min(max(top * sy, 0.0), ih), min((left + w) * sx, iw),
            min((top + h) * sy, ih))
  return img.resize((out_w, out_h), Image.BILINEAR, box=region)


def flip_pil(img, rng: np.random.Generator):
  """A horizontal flip with probability 1/2 (one draw from ``rng``)."""
  return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
