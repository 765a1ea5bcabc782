"""Random-access data sources and the dataset registry.

A source is anything with ``__len__`` and ``__getitem__(i) -> dict of numpy arrays`` (what grain's
``MapDataset.source`` reads). ``get_source(data_config, split)`` returns ``(source, info)`` where ``info`` holds
``num_classes`` and ``num_examples`` (after any class filtering, so that epochs and schedules are right).
"""

import dataclasses
from typing import Callable, Dict, Mapping, Tuple

import numpy as np

from fct_jax.data import shapes
from fct_jax.errors import FCTError


class ArraySource:
  """A source over in-memory arrays of equal length: element i is ``{k: arrays[k][i]}``."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise FCTError(f"arrays of different lengths: {lengths}")
    self.arrays = dict(arrays)
    self._n = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}

  def __repr__(self):
    return f"ArraySource(n={self._n}, keys={sorted(self.arrays)})"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  num_examples: int
  num_classes: int
  image_size: int


def _shapes_source(cfg, split: str) -> Tuple[ArraySource, SplitInfo]:
  sizes = {"old_train": cfg.num_old_train, "new_train": cfg.num_new_train, "eval": cfg.num_eval}
  if split not in sizes:
    raise FCTError(f"unknown split {split!r} for dataset 'shapes'; valid: {', '.join(sizes)}")
  arrays = shapes.make_split(split, num_examples=int(sizes[split]), seed=int(cfg.seed),
                             image_size=int(cfg.image_size), num_old_shapes=int(cfg.num_old_shapes))
  src = ArraySource(arrays)
  return src, SplitInfo(len(src), shapes.num_classes(split), int(cfg.image_size))


DATASETS: Dict[str, Callable] = {
    "shapes": _shapes_source,
}


def get_source(data_cfg, split: str):
  """Returns ``(source, SplitInfo)`` for ``data_cfg.name``; unknown names raise listing the valid ones."""
  name = data_cfg.name
  if name not in DATASETS:
    raise FCTError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
  src, info = DATASETS[name](data_cfg, split)
  if info.num_examples == 0:
    raise FCTError(f"dataset {name!r} split {split!r} is empty")
  return src, info
