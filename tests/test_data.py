"""Demo data generator and grain pipeline: determinism, label semantics, resume and multi-host slicing."""

import numpy as np
import pytest

from fct_jax import artifacts
from fct_jax.data import augment, image_spec, pipeline, shapes, sources
from fct_jax.errors import FCTError


def test_shapes_deterministic_and_labelled():
  a = shapes.make_split.__wrapped__("new_train", num_examples=200, seed=3, image_size=16)
  b = shapes.make_split.__wrapped__("new_train", num_examples=200, seed=3, image_size=16)
  c = shapes.make_split.__wrapped__("new_train", num_examples=200, seed=4, image_size=16)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  assert a["image"].shape == (200, 16, 16, 3) and a["image"].dtype == np.uint8
  nc = len(shapes.COLOURS)
  np.testing.assert_array_equal(a["label"], a["shape"] * nc + a["colour"])
  assert set(a["shape"]) == set(range(len(shapes.SHAPES)))


def test_old_split_has_old_shapes_and_colour_labels():
  d = shapes.make_split("old_train", num_examples=120, seed=0, image_size=16, num_old_shapes=3)
  assert set(d["shape"]) == {0, 1, 2}
  np.testing.assert_array_equal(d["label"], d["colour"])
  assert shapes.num_classes("old_train") == len(shapes.COLOURS)


def test_eval_split_differs_from_train():
  tr = shapes.make_split("new_train", num_examples=50, seed=0, image_size=16)
  ev = shapes.make_split("eval", num_examples=50, seed=0, image_size=16)
  assert not np.array_equal(tr["image"], ev["image"])


def test_shapes_are_visible_in_pixels():
  # The colour of the shape's pixels must match the colour label: the brightest channel of the mean foreground.
  d = shapes.make_split("eval", num_examples=40, seed=0, image_size=32)
  img = d["image"].astype(np.float32) / 255.0
  palette = np.asarray(list(shapes.COLOURS.values()))
  dist = np.linalg.norm(img[..., None, :] - palette, axis=-1).min(-1)  # [N, H, W]
  fg = dist < 0.2
  assert fg.mean(axis=(1, 2)).min() > 0.02  # every image has a visible shape


# The in-memory datasets' convention, as the resolvers bind it for a shapes or digits data config.
PAD_CROP_FLIP = augment.train_transform("pad_crop_flip", image_spec.SMALL_ARRAYS)


def _src(n=100):
  return sources.ArraySource({"image": np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3) % 251,
                              "label": np.arange(n, dtype=np.int32)})


def test_train_batches_resume_and_epochs():
  src = _src(40)
  full = [b["label"] for b in pipeline.train_batches(src, global_batch_size=8, seed=0, start_step=0, num_steps=10,
                                                     transform=PAD_CROP_FLIP)]
  resumed = [b["label"] for b in pipeline.train_batches(src, global_batch_size=8, seed=0, start_step=6,
                                                        num_steps=10, transform=PAD_CROP_FLIP)]
  for a, b in zip(full[6:], resumed):
    np.testing.assert_array_equal(a, b)
  # Each epoch (5 steps) is a permutation of the data, and epochs are shuffled differently.
  ep0, ep1 = np.concatenate(full[:5]), np.concatenate(full[5:])
  assert sorted(ep0) == list(range(40)) and sorted(ep1) == list(range(40))
  assert not np.array_equal(ep0, ep1)


def test_train_batches_per_process_slices_compose():
  src = _src(64)
  one = list(pipeline.train_batches(src, global_batch_size=16, seed=5, start_step=0, num_steps=3,
                                    transform=PAD_CROP_FLIP))
  two = [list(pipeline.train_batches(src, global_batch_size=16, seed=5, start_step=0, num_steps=3,
                                     transform=PAD_CROP_FLIP, process_index=p, process_count=2))
         for p in range(2)]
  for s in range(3):
    for k in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([two[0][s][k], two[1][s][k]]), one[s][k])


def test_eval_batches_pad_and_mask():
  src = _src(21)
  tf = augment.eval_transform("default", image_spec.SMALL_ARRAYS)
  bs = list(pipeline.eval_batches(src, global_batch_size=8, transform=tf))
  assert len(bs) == 3
  mask = np.concatenate([b["mask"] for b in bs])
  labels = np.concatenate([b["label"] for b in bs])
  assert mask.sum() == 21
  np.testing.assert_array_equal(labels[mask > 0], np.arange(21))


def test_unknown_dataset_and_split():
  import ml_collections
  with pytest.raises(FCTError, match="unknown dataset"):
    sources.get_source(ml_collections.ConfigDict({"name": "nope"}), "eval")
  cfg = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 8, "num_new_train": 8, "num_eval": 8,
                                   "seed": 0, "image_size": 8, "num_old_shapes": 3})
  with pytest.raises(FCTError, match="unknown split"):
    sources.get_source(cfg, "test")


def test_padded_eval_gives_the_same_metrics_as_unpadded():
  """40 eval images: batch 16 pads the last batch (masked out), batch 8 does not; embeddings and metrics agree."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fct_jax import retrieval  # pylint: disable=g-import-not-at-top
  from fct_jax.models import small_cnn  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 8, "num_new_train": 8, "num_eval": 40,
                                   "seed": 0, "image_size": 16, "num_old_shapes": 3})
  src, _ = sources.get_source(cfg, "eval")
  model = small_cnn.SmallCNN(num_classes=0, embedding_dim=8, widths=(4, 8))
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), np.zeros((8, 16, 16, 3), np.float32))
  tf = augment.eval_transform("default", cfg)
  padded = artifacts.embed(model, variables, src, batch_size=16, transform=tf)
  exact = artifacts.embed(model, variables, src, batch_size=8, transform=tf)
  assert padded.shape == exact.shape == (40, 8)
  np.testing.assert_allclose(padded, exact, rtol=1e-5, atol=1e-6)
  labels = artifacts.source_labels(src)
  a = retrieval.evaluate(padded, padded, labels, labels, query_is_gallery=True)
  b = retrieval.evaluate(exact, exact, labels, labels, query_is_gallery=True)
  assert a == b
