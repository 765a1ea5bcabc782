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
