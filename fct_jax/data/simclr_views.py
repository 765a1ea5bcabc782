"""SimCLR's two-view augmentation, in the dataset's input convention.

The crop is resized as the dataset's :class:`~fct_jax.data.image_spec.ImageSpec` says (numpy bilinear for the
in-memory arrays, PIL antialiased for photos: the same resize the dataset's evaluation transforms use), colour
jitter, grayscale, gamma and blur run in numpy on float [0, 1], and the view is normalised with the dataset's
mean/std — so ψ trains on the input distribution it is later applied to. Every random draw comes from the grain
rng, in a fixed order.
"""

import numpy as np

from fct_jax.data import resizing
from fct_jax.data.image_spec import ImageSpec
from fct_jax.errors import FCTError

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


def check_rotation(spec: ImageSpec, rotation: float):
  """Refuses a rotated crop for a dataset whose resize cannot do one: rotated crops exist in numpy only (the demo's
  shapes); the PIL path would need a rotated, antialiased resample that no config has asked for."""
  if rotation and spec.resize != "numpy":
    raise FCTError(f"SimCLR view rotation={rotation} needs the numpy resize (in-memory datasets); this dataset "
                   f"resizes with {spec.resize!r}: set views.rotation=0")


def _crop_to_unit(image, box, out: int, rng: np.random.Generator, spec: ImageSpec, rotation: float) -> np.ndarray:
  """The crop ``box`` of ``image`` resized to [out, out] with the dataset's method, float32 in [0, 1]."""
  if spec.resize == "pil":
    return resizing.to_unit(resizing.resized_region(image, box, out, out, draft=False), "pil")
  img = resizing.to_unit(image, "numpy")
  if rotation:
    return resizing.rotated_crop_bilinear(img, box, np.deg2rad(rng.uniform(-rotation, rotation)), out, out)
  return resizing.resize_bilinear(img, box, out, out)


def simclr_view(image, rng: np.random.Generator, *, spec: ImageSpec, out_size: int, crop_scale, flip: bool,
                jitter_strength: float, jitter_prob: float, grayscale_prob: float, blur_prob: float,
                rotation: float, max_hue: float, gamma: float) -> np.ndarray:
  """One SimCLR view of an image → normalised float32 [S, S, 3] (S = out_size or the image height).

  SimCLR (Chen et al. 2020, appendix A): random resized crop, horizontal flip, colour jitter with strength s
  (brightness/contrast/saturation 0.8·s, hue 0.2·s) applied with probability 0.8, grayscale with probability
  0.2, and Gaussian blur (σ ∈ [0.1, 2.0], kernel 10% of the side) for ImageNet-size images. Their CIFAR recipe
  uses s = 0.5 and no blur, our default. ``rotation`` > 0 (not in SimCLR's default set; numpy resize only) also
  rotates the crop by U(−rotation, rotation) degrees, for data whose orientation is a nuisance (the demo's shapes).
  ``max_hue`` ≥ 0 replaces the hue range 0.2·s (in turns; 0.5 = any hue), for data where hue alone identifies
  images. ``gamma`` > 1 (ours, not SimCLR's) raises each channel to a power log-uniform in [1/gamma, gamma] after
  the jitter: a non-linear tone change that alters intensity ratios (e.g. of a foreground to its background),
  which the affine brightness/contrast jitter leaves as an instance cue.

  Args:
    image: uint8 [H, W, 3] for a numpy-resize ``spec``; an RGB PIL image (or uint8 array) for a pil one.
    rng: per-example generator.
    spec: the dataset's resize method and normalisation.
  """
  check_rotation(spec, rotation)
  if spec.resize == "pil":
    image = resizing.pil_open(image)  # PIL images pass through
    w, h = image.size
  else:
    h, w = image.shape[:2]
  out = out_size or h
  box = resizing.random_resized_crop_box(rng, h, w, scale=tuple(crop_scale))
  img = _crop_to_unit(image, box, out, rng, spec, rotation)
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
  return spec.normalise(img)


def simclr_two_views(example, rng: np.random.Generator, *, spec: ImageSpec, **view_kwargs):
  """The SimCLR training transform: ``view1``, ``view2`` (two independent :func:`simclr_view` draws).

  The input ``image`` (encoded bytes from TFDS sources, or an array) is decoded once for both views, in full
  (a JPEG draft decode would suit only one crop), and dropped (a batch needs only the views); labels, if any, pass
  through unused.
  """
  out = {k: v for k, v in example.items() if k != "image"}
  decode = resizing.pil_rgb if spec.resize == "pil" else resizing.decode_image
  image = decode(example["image"])
  out["view1"] = simclr_view(image, rng, spec=spec, **view_kwargs)
  out["view2"] = simclr_view(image, rng, spec=spec, **view_kwargs)
  return out
