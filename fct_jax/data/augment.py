"""Per-example preprocessing in numpy, run in grain workers (no TensorFlow).

Each transform takes an example dict (``image`` uint8 [H, W, 3], ...) and, for random ones, a
``np.random.Generator`` that grain derives from the seed and the example's global position, so augmentation is
deterministic and identical after a resume or on another host count.
"""

import numpy as np

MEAN = np.asarray([0.5, 0.5, 0.5], np.float32)
STD = np.asarray([0.25, 0.25, 0.25], np.float32)


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] → normalised float32."""
  return (image.astype(np.float32) / 255.0 - MEAN) / STD


def eval_transform(example):
  out = dict(example)
  out["image"] = to_float(example["image"])
  return out


def pad_crop_flip(example, rng: np.random.Generator, *, pad: int = 2, flip: bool = True):
  """CIFAR-style augmentation: reflect-pad by ``pad``, random crop back to size, random horizontal flip."""
  img = example["image"]
  h, w = img.shape[:2]
  if pad:
    img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    y, x = rng.integers(0, 2 * pad + 1, size=2)
    img = img[y:y + h, x:x + w]
  if flip and rng.random() < 0.5:
    img = img[:, ::-1]
  out = dict(example)
  out["image"] = to_float(img)
  return out


TRAIN_TRANSFORMS = {
    "none": lambda ex, rng: eval_transform(ex),
    "pad_crop_flip": pad_crop_flip,
}


# ------------------------------------------------------------------------------------------------------------------
# SimCLR two-view augmentation (demo / CIFAR-size images), numpy only. Every random draw comes from the grain rng.


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


# ITU-R 601 luma weights (torchvision's rgb_to_grayscale).
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)
# RGB ↔ YIQ: hue is the angle in the IQ plane, so a hue shift is a rotation there — one 3×3 matrix per image.
_RGB2YIQ = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


def _hue_matrix(turns: float) -> np.ndarray:
  c, s = np.cos(2 * np.pi * turns), np.sin(2 * np.pi * turns)
  rot = np.asarray([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
  return _YIQ2RGB @ rot @ _RGB2YIQ


def color_jitter(img: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1) -> np.ndarray:
  """torchvision-style ``ColorJitter`` on a float image [H, W, 3] in [0, 1]; the four ops in random order.

  Factors: brightness/contrast/saturation ~ U(1 − s, 1 + s), hue shift ~ U(−hue, hue) turns.
  Not ml-fct (which ships no SimCLR training): the hue shift is a rotation in YIQ space instead of an HSV round
  trip — a linear map per image, much cheaper in numpy, with the same effect of cycling hues at fixed luma.
  """
  for op in rng.permutation(4):
    if op == 0 and brightness:
      img = img * rng.uniform(1 - brightness, 1 + brightness)
    elif op == 1 and contrast:
      mean = float(np.mean(img @ _LUMA))
      img = mean + (img - mean) * rng.uniform(1 - contrast, 1 + contrast)
    elif op == 2 and saturation:
      gray = (img @ _LUMA)[..., None]
      img = gray + (img - gray) * rng.uniform(1 - saturation, 1 + saturation)
    elif op == 3 and hue:
      img = img @ _hue_matrix(rng.uniform(-hue, hue)).T
    img = np.clip(img, 0.0, 1.0)  # torchvision clamps after every op
  return img


def gaussian_blur(img: np.ndarray, sigma: float, *, kernel_size: int) -> np.ndarray:
  """Separable Gaussian blur of [H, W, C] with reflect padding (SimCLR's blur; used for large images only)."""
  r = kernel_size // 2
  t = np.arange(-r, r + 1, dtype=np.float32)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k /= k.sum()
  p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="reflect")
  img = sum(k[i] * p[i:i + img.shape[0]] for i in range(2 * r + 1))
  p = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(k[i] * p[:, i:i + img.shape[1]] for i in range(2 * r + 1))


def simclr_view(image: np.ndarray, rng: np.random.Generator, *, out_size: int = 0, crop_scale=(0.08, 1.0),
                flip: bool = True, jitter_strength: float = 0.5, jitter_prob: float = 0.8,
                grayscale_prob: float = 0.2, blur_prob: float = 0.0, rotation: float = 0.0,
                max_hue: float = -1.0, gamma: float = 1.0) -> np.ndarray:
  """One SimCLR view of a uint8 image [H, W, 3] → normalised float32 [S, S, 3] (S = out_size or H).

  SimCLR (Chen et al. 2020, appendix A): random resized crop, horizontal flip, colour jitter with strength s
  (brightness/contrast/saturation 0.8·s, hue 0.2·s) applied with probability 0.8, grayscale with probability
  0.2, and Gaussian blur (σ ∈ [0.1, 2.0], kernel 10% of the side) for ImageNet-size images. Their CIFAR recipe
  uses s = 0.5 and no blur, our default. ``rotation`` > 0 (not in SimCLR's default set) also rotates the crop by
  U(−rotation, rotation) degrees, for data whose orientation is a nuisance (the demo's shapes). ``max_hue`` ≥ 0
  replaces the hue range 0.2·s (in turns; 0.5 = any hue), for data where hue alone identifies images. ``gamma``
  > 1 (ours, not SimCLR's) raises each channel to a power log-uniform in [1/gamma, gamma] after the jitter: a
  non-linear tone change that alters intensity ratios (e.g. of a foreground to its background), which the affine
  brightness/contrast jitter leaves as an instance cue.
  """
  h, w = image.shape[:2]
  out = out_size or h
  img = image.astype(np.float32) / 255.0
  box = random_resized_crop_box(rng, h, w, scale=tuple(crop_scale))
  if rotation:
    img = rotated_crop_bilinear(img, box, np.deg2rad(rng.uniform(-rotation, rotation)), out, out)
  else:
    img = resize_bilinear(img, box, out, out)
  if flip and rng.random() < 0.5:
    img = img[:, ::-1]
  s = float(jitter_strength)
  if s and rng.random() < jitter_prob:
    hue = 0.2 * s if max_hue < 0 else float(max_hue)
    img = color_jitter(img, rng, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=hue)
  if rng.random() < grayscale_prob:
    img = np.repeat((img @ _LUMA)[..., None], 3, axis=-1)
  if gamma != 1.0:
    g = np.exp(rng.uniform(-np.log(gamma), np.log(gamma), 3)).astype(np.float32)
    img = np.power(np.maximum(img, 0.0), g)
  if blur_prob and rng.random() < blur_prob:
    img = gaussian_blur(img, rng.uniform(0.1, 2.0), kernel_size=max(3, (out // 10) | 1))
  return ((img - MEAN) / STD).astype(np.float32)


def simclr_two_views(example, rng: np.random.Generator, **view_kwargs):
  """The SimCLR training transform: ``view1``, ``view2`` (two independent :func:`simclr_view` draws).

  The input ``image`` is dropped (a batch needs only the views); labels, if any, pass through unused.
  """
  out = {k: v for k, v in example.items() if k != "image"}
  image = decode_image(example["image"])  # TFDS sources hand over encoded bytes; decode once for both views
  out["view1"] = simclr_view(image, rng, **view_kwargs)
  out["view2"] = simclr_view(image, rng, **view_kwargs)
  return out


# Two-view transforms by name; a stage passes its config's view options as keyword arguments.
TWO_VIEW_TRANSFORMS = {
    "simclr": simclr_two_views,
}


# ------------------------------------------------------------------------------------------------------------------
# Paper datasets (ImageNet, Places, VGGFace2, CIFAR at 224): PIL decode + crop/resize, ImageNet normalisation.
# Images arrive as encoded bytes (TFDS sources) or uint8 arrays (mock data, in-memory sources).

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)  # ml-fct's Normalize (torchvision's values)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)


def _pil_open(image):
  """A lazily decoded PIL image from encoded bytes, or a PIL image of a uint8 array [H, W, 3] (PIL passes)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
    return Image.open(io.BytesIO(bytes(image)))  # reads the header only; pixels are decoded on first use
  return Image.fromarray(np.asarray(image, np.uint8))


def decode_image(image) -> np.ndarray:
  """uint8 [H, W, 3] from encoded bytes (TFDS sources) or an array (passed through): for numpy-only transforms."""
  if isinstance(image, np.ndarray):
    return image
  img = _pil_open(image)
  return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _draft(img, scale: float):
  """Lets a JPEG decode at reduced size (DCT scaling, 1/2–1/8) when the result is shrunk by ``scale`` < 1 anyway.

  PIL picks the smallest scale whose size is still at least the requested one, so the region resized afterwards
  keeps at least its output size: the output is a (slightly different) bilinear downsample of the same region,
  several times cheaper to decode. No-op for other formats and for arrays.
  """
  if scale < 1.0 and getattr(img, "format", None) == "JPEG":
    w, h = img.size
    img.draft("RGB", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))


def _to_normalised(img, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  return (np.asarray(img, np.float32) * (1.0 / 255.0) - mean) / std


def _resized_region(img, box, out_h: int, out_w: int, *, draft: bool = True):
  """PIL bilinear (antialiased, as torchvision on PIL images) resize of ``box = (top, left, h, w)`` — in the
  coordinates of the undecoded image ``img`` — to ``[out_h, out_w]``; returns an RGB PIL image."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
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


def _flip(img, rng: np.random.Generator):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def inception_crop_flip(example, rng: np.random.Generator, *, size: int = 224, scale=(0.08, 1.0),
                        ratio=(3.0 / 4.0, 4.0 / 3.0), draft: bool = True):
  """ImageNet training augmentation (ml-fct ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip``).

  Args:
    example: ``image`` as encoded bytes or uint8 [H, W, 3]; other fields pass through.
    rng: per-example generator (grain: seed + global position), so the crop is resume- and host-count-exact.
    size: output side S.
  Returns:
    the example with ``image`` float32 [S, S, 3], normalised with the ImageNet mean/std.
  """
  img = _pil_open(example["image"])
  w, h = img.size
  box = random_resized_crop_box(rng, h, w, scale=tuple(scale), ratio=tuple(ratio))
  img = _flip(_resized_region(img, box, size, size, draft=draft), rng)
  out = dict(example)
  out["image"] = _to_normalised(img)
  return out


def resize_center_crop(example, *, resize: int = 256, crop: int = 224, draft: bool = True):
  """ImageNet evaluation: shorter side to ``resize``, centre ``crop`` (ml-fct ``Resize(256)``, ``CenterCrop(224)``).

  Done as one resize of the source region that maps onto the centre crop (same pixels as resize-then-crop up
  to rounding, and no full-size intermediate image).
  """
  img = _pil_open(example["image"])
  w, h = img.size
  s = resize / min(w, h)
  rw, rh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)  # torchvision's rounding
  top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
  box = (top / s, left / s, crop / s, crop / s)
  img = _resized_region(img, box, crop, crop, draft=draft)
  out = dict(example)
  out["image"] = _to_normalised(img)
  return out


def resize_flip(example, rng=None, *, size: int = 224, flip: bool = True):
  """ml-fct's CIFAR-100 transforms: ``Resize(224)`` (+ ``RandomHorizontalFlip`` for training, when ``rng``).

  CIFAR images are square, so this is a resize to ``size × size``; other shapes are squashed to it (a batch needs
  one shape), where torchvision would keep the aspect ratio.
  """
  img = _pil_open(example["image"])
  w, h = img.size
  img = _resized_region(img, (0, 0, h, w), size, size, draft=False)
  if flip and rng is not None:
    img = _flip(img, rng)
  out = dict(example)
  out["image"] = _to_normalised(img)
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


def face_crop(example, rng=None, *, size: int = 224, resize: int = 256):
  """VGGFace2 (Cao et al. 2018): extended loose box, shorter side → ``resize``, then a ``size`` crop — random
  plus a horizontal flip for training (``rng`` given), central for evaluation. ``bbox`` is consumed.

  ml-fct has no VGGFace2 pipeline and the paper's appendix gives no face preprocessing; this is VGGFace2's own.
  """
  img = _pil_open(example["image"])
  w, h = img.size
  top, left, bh, bw = face_box(example.get("bbox", np.zeros(4)), w, h)
  s = resize / min(bw, bh)
  rw, rh = max(size, int(round(bw * s))), max(size, int(round(bh * s)))
  if rng is not None:
    oy, ox = int(rng.integers(0, rh - size + 1)), int(rng.integers(0, rw - size + 1))
  else:
    oy, ox = (rh - size) // 2, (rw - size) // 2
  box = (top + oy / s, left + ox / s, size / s, size / s)
  img = _resized_region(img, box, size, size)
  if rng is not None:
    img = _flip(img, rng)
  out = {k: v for k, v in example.items() if k != "bbox"}
  out["image"] = _to_normalised(img)
  return out


def _register():
  import functools  # pylint: disable=g-import-not-at-top
  p = functools.partial
  TRAIN_TRANSFORMS.update({
      "inception_crop_flip": inception_crop_flip,  # ImageNet / Places, 224
      "resize_flip_224": p(resize_flip, size=224),  # ml-fct's CIFAR-100
      "face_crop_flip": face_crop,  # VGGFace2, 224
      "pad_crop": p(pad_crop_flip, flip=False),  # digits: mirrored digits are other digits
      # Small sizes for runlocal / CPU runs of the same pipelines.
      "inception_crop_flip_32": p(inception_crop_flip, size=32),
      "face_crop_flip_32": p(face_crop, size=32, resize=36),
  })
  EVAL_TRANSFORMS.update({
      "resize256_crop224": resize_center_crop,
      "resize_224": p(resize_flip, size=224, flip=False),
      "face_crop": lambda ex: face_crop(ex),
      "resize36_crop32": p(resize_center_crop, resize=36, crop=32),
      "face_crop_32": lambda ex: face_crop(ex, size=32, resize=36),
  })


# Evaluation (deterministic) transforms by name: a stage config's ``eval_augment`` picks one ("default" when
# absent: the uint8 → float conversion of in-memory demo data).
EVAL_TRANSFORMS = {"default": eval_transform}
_register()


def get_eval_transform(name: str = "default"):
  """The evaluation transform ``fn(example) -> example`` registered as ``name``."""
  from fct_jax.errors import FCTError  # pylint: disable=g-import-not-at-top
  if name not in EVAL_TRANSFORMS:
    raise FCTError(f"unknown eval_augment {name!r}; valid: {', '.join(EVAL_TRANSFORMS)}")
  return EVAL_TRANSFORMS[name]
