"""Per-example transforms by name, resolved against a dataset; run in grain workers (numpy and PIL, no TensorFlow).

A stage config names its transforms (``augment``, ``eval_augment``, ``simclr.augment``) and the resolvers
:func:`train_transform`, :func:`eval_transform` and :func:`two_view_transform` bind them to the dataset's
:class:`~fct_jax.data.image_spec.ImageSpec` (normalisation, resize method), so every transform of one dataset
feeds the network the same input distribution. The resolvers are the one place an unknown name is refused.

Each transform takes an example dict (``image`` uint8 [H, W, 3] or encoded bytes, ...) and, for random ones, a
``np.random.Generator`` that grain derives from the seed and the example's global position, so augmentation is
deterministic and identical after a resume or on another host count. The small-image transforms live here; the
paper datasets' PIL recipes in :mod:`fct_jax.data.photos`, SimCLR's views in :mod:`fct_jax.data.simclr_views`.
"""

import functools
from typing import Callable, Mapping

import numpy as np

from fct_jax import config_schema
from fct_jax.data import photos, resizing, simclr_views, sources
from fct_jax.data.image_spec import ImageSpec
from fct_jax.errors import FCTError


def to_input(example, *, spec: ImageSpec):
  """No augmentation: the image (decoded if it arrives encoded) as the network input, normalised per ``spec``."""
  out = dict(example)
  out["image"] = spec.normalise(resizing.to_unit(resizing.decode_image(example["image"]), spec.resize))
  return out


def pad_crop_flip(example, rng: np.random.Generator, *, spec: ImageSpec, pad: int = 2, flip: bool = True):
  """CIFAR-style augmentation: reflect-pad by ``pad``, random crop back to size, random horizontal flip."""
  img = example["image"]
  h, w = img.shape[:2]
  if pad:
    img = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    y, x = rng.integers(0, 2 * pad + 1, size=2)
    img = img[y:y + h, x:x + w]
  if flip and rng.random() < 0.5:
    img = img[:, ::-1]
  return to_input({**example, "image": img}, spec=spec)


def _no_augment(example, rng, *, spec: ImageSpec):
  del rng
  return to_input(example, spec=spec)


_partial = functools.partial  # binds a recipe's size options; the resolvers bind the dataset
# Training transforms ``fn(example, rng, *, spec)`` by name (a stage config's ``augment``).
TRAIN_TRANSFORMS = {
    "none": _no_augment,
    "pad_crop_flip": pad_crop_flip,
    "pad_crop": _partial(pad_crop_flip, flip=False),  # digits: mirrored digits are other digits
    "inception_crop_flip": photos.inception_crop_flip,  # ImageNet / Places, 224
    "resize_flip_224": _partial(photos.resize_flip, size=224),  # ml-fct's CIFAR-100
    "face_crop_flip": photos.face_crop,  # VGGFace2, 224
    # Small sizes for runlocal / CPU runs of the same pipelines.
    "inception_crop_flip_32": _partial(photos.inception_crop_flip, size=32),
    "face_crop_flip_32": _partial(photos.face_crop, size=32, resize=36),
}
# Evaluation (deterministic) transforms ``fn(example, *, spec)`` by name (a stage config's ``eval_augment``;
# "default": no resize, the image as it is).
EVAL_TRANSFORMS = {
    "default": to_input,
    "resize256_crop224": photos.resize_center_crop,
    "resize_224": _partial(photos.resize_flip, size=224, flip=False),
    "face_crop": photos.face_crop,
    "resize36_crop32": _partial(photos.resize_center_crop, resize=36, crop=32),
    "face_crop_32": _partial(photos.face_crop, size=32, resize=36),
}
# Two-view transforms ``fn(example, rng, *, spec, **view_kwargs)`` by name (``simclr.augment``).
TWO_VIEW_TRANSFORMS = {
    "simclr": simclr_views.simclr_two_views,
}


def _lookup(table: Mapping[str, Callable], name: str) -> Callable:
  if name not in table:
    raise FCTError(f"unknown augment {name!r}; valid: {', '.join(table)}")
  return table[name]


def _spec(data) -> ImageSpec:
  return data if isinstance(data, ImageSpec) else sources.get_image_spec(data)


def train_transform(name: str, data_cfg) -> Callable:
  """The training transform ``fn(example, rng)`` named ``name``, for the dataset of ``data_cfg`` (a data config,
  or an :class:`ImageSpec` directly)."""
  return functools.partial(_lookup(TRAIN_TRANSFORMS, name), spec=_spec(data_cfg))


def eval_transform(name: str, data_cfg) -> Callable:
  """The evaluation transform ``fn(example)`` named ``name`` ("default": no resize), for the dataset of
  ``data_cfg`` (a data config, or an :class:`ImageSpec` directly)."""
  return functools.partial(_lookup(EVAL_TRANSFORMS, name), spec=_spec(data_cfg))


def two_view_transform(name: str, data_cfg, **view_kwargs) -> Callable:
  """The two-view transform ``fn(example, rng) -> {view1, view2, ...}`` named ``name``, for the dataset of
  ``data_cfg``, with the view options ``view_kwargs`` (keyword arguments of :func:`simclr_views.simclr_view`; those
  not given are the stage config's defaults, ``config_schema.SIMCLR_VIEWS``).

  View options the dataset's resize cannot do (a rotation with PIL) are refused here, before any data is read.
  """
  fn = _lookup(TWO_VIEW_TRANSFORMS, name)
  spec = _spec(data_cfg)
  views = {**config_schema.SIMCLR_VIEWS, **view_kwargs}
  simclr_views.check_rotation(spec, views["rotation"])
  return functools.partial(fn, spec=spec, **views)
