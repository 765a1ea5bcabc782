"""Input normalisation and resizing are properties of the dataset: ψ trains on the inputs it is applied to.

ψ (SimCLR's encoder) is trained on two-view batches and used (transformation stage, evaluation) on the stage's
evaluation transform; both must normalise, and resize, as the dataset says.
"""

import importlib

import numpy as np
import pytest

from fct_jax.data import augment, image_spec, resizing, sources
from fct_jax.errors import FCTError

CONFIGS = ("imagenet", "places365", "vggface2", "cifar100", "demo", "digits")
# Every augmentation off: the view is the whole image, resized to the evaluation size and normalised.
PLAIN_VIEW = dict(crop_scale=(1.0, 1.0), flip=False, jitter_strength=0.0, grayscale_prob=0.0, blur_prob=0.0,
                  rotation=0.0, gamma=1.0)


def _psi_stage(cfg_name):
  """The runlocal stage config that trains ψ (side_info), or the old model's where the plan has no side_info."""
  cfg = importlib.import_module(f"configs.{cfg_name}").get_config("runlocal")
  stages = cfg["stages"]
  return stages["side_info"] if "side_info" in stages else stages["old"]


@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_plain_simclr_view_equals_the_eval_transform(cfg_name):
  stage = _psi_stage(cfg_name)
  data = stage["data"]
  simclr = stage.get("simclr") or {}
  grey = np.full((40, 40, 3), 117, np.uint8)
  evaluated = augment.eval_transform(stage.get("eval_augment", "default") or "default", data)({"image": grey})
  size = evaluated["image"].shape[0]
  views = augment.two_view_transform(simclr.get("augment", "simclr"), data, **dict(PLAIN_VIEW, out_size=size))
  out = views({"image": grey, "label": 0}, np.random.default_rng(0))
  for v in ("view1", "view2"):
    assert out[v].shape == evaluated["image"].shape and out[v].dtype == np.float32
    np.testing.assert_allclose(out[v], evaluated["image"], rtol=0, atol=1e-6)
  # ... and that is the dataset's normalisation of the grey level.
  spec = sources.get_image_spec(data)
  expect = (117 / 255 - np.asarray(spec.mean)) / np.asarray(spec.std)
  np.testing.assert_allclose(evaluated["image"][0, 0], expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, spec", [("imagenet2012", image_spec.PHOTOS), ("cifar100", image_spec.PHOTOS),
                                        ("shapes", image_spec.SMALL_ARRAYS), ("digits", image_spec.SMALL_ARRAYS)])
def test_datasets_have_their_spec(name, spec):
  assert sources.get_image_spec({"name": name}) == spec
  assert set(sources.IMAGE_SPECS) == set(sources.DATASETS)  # every dataset says how its images become inputs


def test_numpy_view_without_augmentation_is_the_image():
  """In-memory datasets: a full-size view with everything off is exactly the default (no-resize) input."""
  img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  data = {"name": "shapes"}
  view = augment.two_view_transform("simclr", data, **PLAIN_VIEW)({"image": img}, np.random.default_rng(1))
  np.testing.assert_array_equal(view["view1"], augment.eval_transform("default", data)({"image": img})["image"])


def test_photo_views_resize_with_pil_antialiasing():
  """A pil dataset's view is PIL's antialiased bilinear of the sampled crop (as its eval transforms), not numpy's."""
  img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
  kw = dict(PLAIN_VIEW, crop_scale=(0.3, 0.6), out_size=12)
  view = augment.two_view_transform("simclr", {"name": "imagenet2012"}, **kw)({"image": img}, np.random.default_rng(3))
  box = resizing.random_resized_crop_box(np.random.default_rng(3), 64, 80, scale=(0.3, 0.6))  # the view's first draws
  region = resizing.resized_region(resizing.pil_open(img), box, 12, 12, draft=False)
  expect = image_spec.PHOTOS.normalise(resizing.to_unit(region, "pil"))
  np.testing.assert_allclose(view["view1"], expect, rtol=0, atol=1e-6)
  numpy_resize = image_spec.PHOTOS.normalise(resizing.resize_bilinear(resizing.to_unit(img, "numpy"), box, 12, 12))
  assert np.abs(view["view1"] - numpy_resize).mean() > 0.1  # a several-fold shrink: antialiasing matters


def test_rotation_is_refused_for_photo_datasets():
  with pytest.raises(FCTError, match="rotation"):
    augment.two_view_transform("simclr", {"name": "places365"}, rotation=30.0)
  augment.two_view_transform("simclr", {"name": "shapes"}, rotation=30.0)  # numpy datasets rotate


@pytest.mark.parametrize("resolve, valid", [
    (lambda n: augment.train_transform(n, {"name": "shapes"}), augment.TRAIN_TRANSFORMS),
    (lambda n: augment.eval_transform(n, {"name": "shapes"}), augment.EVAL_TRANSFORMS),
    (lambda n: augment.two_view_transform(n, {"name": "shapes"}), augment.TWO_VIEW_TRANSFORMS)])
def test_unknown_augment_is_one_line(resolve, valid):
  with pytest.raises(FCTError) as e:
    resolve("x")
  assert str(e.value) == f"unknown augment 'x'; valid: {', '.join(valid)}"


def test_unknown_dataset_has_no_spec():
  with pytest.raises(FCTError, match="unknown dataset 'nope'"):
    sources.get_image_spec({"name": "nope"})
