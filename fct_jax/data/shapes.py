"""Embedded demo data: small RGB images of coloured shapes (the paper's Figure 1 story), numpy only.

Each image shows one shape (circle, square, triangle, cross, ring) in one colour (red, green, blue, yellow) with
nuisance variation: position, scale, rotation, colour jitter and a noisy background. The splits:

* ``old_train``: only the first ``num_old_shapes`` shapes, labelled by **colour only** — an old model trained on it
  learns colour and has no reason to keep shape information;
* ``new_train``: all shapes, labelled by **(shape, colour)** (``shape * num_colours + colour``);
* ``eval``: held-out images of all shapes labelled by (shape, colour) — query and gallery of the retrieval table.

Generation is vectorised and deterministic given the seed (~20k 32×32 images in about a second).
"""

import functools
from typing import Dict

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
SPLITS = ("old_train", "new_train", "eval")


def _shape_masks(shape_ids, u, v):
  """Inside-masks [N, H, W] for shape ids [N] on canonical coordinates u, v [N, H, W] (shape radius 1)."""
  r2 = u * u + v * v
  au, av = np.abs(u), np.abs(v)
  masks = np.stack([
      r2 <= 1.0,                                                  # circle
      np.maximum(au, av) <= 0.8,                                  # square
      (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * au),               # triangle (equilateral)
      ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),  # cross
      (r2 <= 1.0) & (r2 >= 0.5 ** 2),                             # ring
  ], axis=1)
  return np.take_along_axis(masks, shape_ids[:, None, None, None], axis=1)[:, 0]


def render(shape_ids, colour_ids, *, image_size: int = 32, seed: int = 0, batch: int = 4096) -> np.ndarray:
  """Renders images for given shape and colour ids.

  Args:
    shape_ids, colour_ids: int arrays [N].
    image_size: H = W.
    seed: randomness of the nuisance factors.
  Returns:
    uint8 [N, image_size, image_size, 3].
  """
  shape_ids = np.asarray(shape_ids, np.int64)
  colour_ids = np.asarray(colour_ids, np.int64)
  n = len(shape_ids)
  rng = np.random.default_rng(seed)
  palette = np.asarray(list(COLOURS.values()), np.float32)
  out = np.empty((n, image_size, image_size, 3), np.uint8)
  grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2.0 - 1.0  # [-1, 1]
  yy, xx = np.meshgrid(grid, grid, indexing="ij")
  for lo in range(0, n, batch):
    hi = min(n, lo + batch)
    m = hi - lo
    scale = rng.uniform(0.35, 0.6, m).astype(np.float32)
    cx, cy = (rng.uniform(-1, 1, (2, m)) * (0.95 - scale)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, m).astype(np.float32)
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    u = (c * dx + s * dy) / scale[:, None, None]
    v = (-s * dx + c * dy) / scale[:, None, None]
    mask = _shape_masks(shape_ids[lo:hi], u, -v)[..., None]
    colour = palette[colour_ids[lo:hi]] + rng.normal(0, 0.05, (m, 3)).astype(np.float32)
    bg_level = rng.uniform(0.05, 0.4, (m, 1, 1, 1)).astype(np.float32)
    bg = bg_level + rng.normal(0, 0.06, (m, image_size, image_size, 3)).astype(np.float32)
    img = np.where(mask, colour[:, None, None, :], bg)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    out[lo:hi] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
  return out


def balanced_pairs(num_examples: int, num_shapes: int) -> np.ndarray:
  """The (shape, colour) pair ids ``shape · len(COLOURS) + colour`` of a split, cycling through all pairs (before
  :func:`make_split` shuffles them): the class balance of every split."""
  return np.arange(num_examples) % (num_shapes * len(COLOURS))


@functools.lru_cache(maxsize=8)
def make_split(split: str, *, num_examples: int, seed: int = 0, image_size: int = 32,
               num_old_shapes: int = 3) -> Dict[str, np.ndarray]:
  """One split of the demo data as a dict of arrays (cached: stages of one plan share it).

  Returns:
    dict with ``image`` uint8 [N, S, S, 3], ``label`` int32 [N], ``shape`` int32 [N], ``colour`` int32 [N].
  """
  if split not in SPLITS:
    raise ValueError(f"unknown shapes split {split!r}; valid: {', '.join(SPLITS)}")
  if not 1 <= num_old_shapes <= len(SHAPES):
    raise ValueError(f"num_old_shapes={num_old_shapes} must be in [1, {len(SHAPES)}]")
  # Distinct, fixed seeds per split so that eval images are never training images.
  split_seed = [seed * 1000 + 11, seed * 1000 + 23, seed * 1000 + 37][SPLITS.index(split)]
  rng = np.random.default_rng(split_seed)
  nc = len(COLOURS)
  num_shapes = num_old_shapes if split == "old_train" else len(SHAPES)
  # Balanced classes: cycle through (shape, colour) pairs, then shuffle.
  pair = rng.permutation(balanced_pairs(num_examples, num_shapes))
  shape, colour = (pair // nc).astype(np.int32), (pair % nc).astype(np.int32)
  images = render(shape, colour, image_size=image_size, seed=split_seed + 1)
  label = colour if split == "old_train" else shape * nc + colour
  return {"image": images, "label": label.astype(np.int32), "shape": shape, "colour": colour}


def num_classes(split: str) -> int:
  return len(COLOURS) if split == "old_train" else len(SHAPES) * len(COLOURS)
