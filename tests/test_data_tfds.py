"""Paper datasets through TFDS array_record + grain: class subsets, label cache, transforms, configs.

Two kinds of data, neither downloaded: ``tfds.testing.mock_data`` (works with ``tfds.data_source`` and no
TensorFlow as long as no decoders are passed — our source deserialises records itself), and a tiny real on-disk
array_record dataset written by our VGGFace2 builder from a handful of generated JPEGs (TFDS writes
array_record without TensorFlow when images are given as encoded bytes).
"""

import importlib
import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fct_jax.data import augment, image_spec, photos, pipeline, resizing, sources, tfds_source, vggface2_builder
from fct_jax.errors import FCTError

PAPER_CONFIGS = ("imagenet", "places365", "vggface2", "cifar100")


def _data(cfg_name, split="old_train"):
  return importlib.import_module(f"configs.{cfg_name}").get_config("runlocal").stages[
      {"old_train": "old", "new_train": "new", "eval": "eval"}[split]].data


def _jpeg(h, w, seed, quality=90):
  rng = np.random.default_rng(seed)
  # Smooth content, so that JPEG (and reduced-size DCT decoding) behaves as on photos rather than on noise.
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, rng.integers(256))], -1)
  buf = io.BytesIO()
  Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# A tiny real VGGFace2 on disk: 4 train subjects × 3 images, 2 test subjects × 5 images.

@pytest.fixture(scope="module")
def tiny_vggface2(tmp_path_factory):
  root = tmp_path_factory.mktemp("vggface2_manual")
  boxes = ["NAME_ID,X,Y,W,H"]
  for split, subjects, per in (("train", ["n000004", "n000002", "n000003", "n000001"], 3),
                               ("test", ["n000009", "n000007"], 5)):
    for s in subjects:
      (root / split / s).mkdir(parents=True)
      for j in range(per):
        (root / split / s / f"{j:04d}_01.jpg").write_bytes(_jpeg(40 + 7 * j, 30 + 5 * j, j))
        boxes.append(f"{s}/{j:04d}_01,5,6,20,24")
    (root / "bb_landmark").mkdir(exist_ok=True)
    (root / "bb_landmark" / f"loose_bb_{split}.csv").write_text("\n".join(boxes) + "\n")
    boxes = ["NAME_ID,X,Y,W,H"]
  data_dir = tmp_path_factory.mktemp("tfds")
  vggface2_builder.prepare(str(data_dir), str(root))
  return str(data_dir)


def _vgg_cfg(data_dir, cache_dir, **kw):
  d = {"name": "vggface2", "data_dir": data_dir, "label_cache_dir": str(cache_dir), "old_classes": 2,
       "eval_per_class": 3, "eval_subsample_seed": 0}
  d.update(kw)
  return ml_collections.ConfigDict(d)


def test_real_array_record_splits_labels_and_cache(tiny_vggface2, tmp_path, monkeypatch):
  cfg = _vgg_cfg(tiny_vggface2, tmp_path / "cache")
  new, info_new = sources.get_source(cfg, "new_train")
  assert len(new) == info_new.num_examples == 12 and info_new.num_classes == 8631
  old, info = sources.get_source(cfg, "old_train")
  # Sorted subject ids: n000001 → 0, n000002 → 1: the first 2 subjects' 6 images, counted without decoding.
  assert info.num_examples == len(old) == 6 and info.num_classes == 2
  np.testing.assert_array_equal(np.sort(old.arrays["label"]), [0, 0, 0, 1, 1, 1])
  ex = old[0]
  assert isinstance(ex["image"], bytes) and ex["bbox"].shape == (4,) and ex["label"] in (0, 1)
  np.testing.assert_allclose(ex["bbox"], [5, 6, 20, 24])
  assert list((tmp_path / "cache").glob("*.npy"))  # the label index is cached ...

  def boom(*a, **k):
    raise AssertionError("labels re-read despite the cache")
  monkeypatch.setattr(tfds_source, "read_labels", boom)
  again, _ = sources.get_source(cfg, "old_train")  # ... and reused
  np.testing.assert_array_equal(again.indices, old.indices)


def test_real_eval_subsample_fixed_per_subject(tiny_vggface2, tmp_path):
  cfg = _vgg_cfg(tiny_vggface2, tmp_path)
  ev, info = sources.get_source(cfg, "eval")
  labels = ev.arrays["label"]
  # Test subjects follow the 4 train subjects' labels; 3 of each subject's 5 images.
  assert sorted(set(labels.tolist())) == [4, 5] and np.bincount(labels)[4:].tolist() == [3, 3]
  assert info.num_classes == 2 and info.num_examples == 6
  ev2, _ = sources.get_source(cfg, "eval")
  np.testing.assert_array_equal(ev.indices, ev2.indices)  # fixed: same subsample every time
  other, _ = sources.get_source(_vgg_cfg(tiny_vggface2, tmp_path, eval_subsample_seed=1), "eval")
  assert len(other) == 6


def test_real_data_through_pipeline_and_face_transform(tiny_vggface2, tmp_path):
  src, _ = sources.get_source(_vgg_cfg(tiny_vggface2, tmp_path), "new_train")
  tf = augment.train_transform("face_crop_flip_32", _vgg_cfg(tiny_vggface2, tmp_path))
  bs = list(pipeline.train_batches(src, global_batch_size=4, seed=0, start_step=0, num_steps=3, transform=tf))
  assert bs[0]["image"].shape == (4, 32, 32, 3) and bs[0]["image"].dtype == np.float32
  resumed = next(pipeline.train_batches(src, global_batch_size=4, seed=0, start_step=2, num_steps=3, transform=tf))
  np.testing.assert_array_equal(resumed["image"], bs[2]["image"])
  np.testing.assert_array_equal(resumed["label"], bs[2]["label"])


def test_missing_dataset_is_one_line_with_the_build_command(tmp_path):
  cfg = ml_collections.ConfigDict({"name": "imagenet2012", "data_dir": str(tmp_path / "nope")})
  with pytest.raises(FCTError) as e:
    sources.get_source(cfg, "old_train")
  msg = str(e.value)
  assert "\n" not in msg and "imagenet2012" in msg and str(tmp_path / "nope") in msg
  assert f"tfds build imagenet2012 --data_dir={tmp_path / 'nope'} --file_format=array_record" in msg
  with pytest.raises(FCTError, match="python -m fct_jax.data.vggface2_builder"):
    sources.get_source(ml_collections.ConfigDict({"name": "vggface2", "data_dir": str(tmp_path)}), "eval")


def test_unknown_split_lists_valid_ones():
  with pytest.raises(FCTError, match="train_<K>"):
    sources.get_source(_data("cifar100"), "validation")
  with pytest.raises(FCTError, match="asks for 2000 classes"):
    sources.get_source(_data("cifar100"), "train_2000")


# ---------------------------------------------------------------------------------------------------------------
# Mock data (the configs' runlocal data blocks).

@pytest.mark.parametrize("cfg_name", PAPER_CONFIGS)
def test_mock_class_subset_counts(cfg_name):
  data = _data(cfg_name)
  spec = sources.TFDS_DATASETS[data.name]
  old, info = sources.get_source(data, "old_train")
  new, info_new = sources.get_source(data, "new_train")
  k = int(data.get("old_classes", 0) or spec.old_classes)
  # Brute force over the mock records (decoding everything) agrees with the label index.
  all_labels = np.asarray([int(new.ds[i]["label"]) for i in range(len(new.ds))])
  assert info.num_examples == len(old) == int(np.sum(all_labels < k)) > 0
  assert info.num_classes == k and info_new.num_classes == spec.num_classes
  assert info_new.num_examples == int(np.sum(all_labels < spec.num_classes))
  assert set(old.arrays["label"].tolist()) <= set(range(k))
  np.testing.assert_array_equal(old.arrays["label"], [old[i]["label"] for i in range(len(old))])


def test_sequence_splits_nest():
  data = _data("imagenet")
  sizes = [sources.get_source(data, s)[1].num_examples for s in ("train_250", "train_500", "new_train")]
  assert sizes[0] <= sizes[1] <= sizes[2] and sizes[1] == sources.get_source(data, "old_train")[1].num_examples


def test_mock_eval_batches_cover_source_in_order():
  src, _ = sources.get_source(_data("imagenet", "eval"), "eval")
  tf = augment.eval_transform("resize36_crop32", _data("imagenet", "eval"))
  bs = list(pipeline.eval_batches(src, global_batch_size=20, transform=tf))
  mask = np.concatenate([b["mask"] for b in bs])
  labels = np.concatenate([b["label"] for b in bs])
  assert mask.sum() == len(src) and bs[0]["image"].shape == (20, 32, 32, 3)
  np.testing.assert_array_equal(labels[mask > 0], src.arrays["label"])


# ---------------------------------------------------------------------------------------------------------------
# Transforms.

def test_train_transforms_deterministic_given_rng():
  jpg = _jpeg(120, 160, 0)
  for name in ("inception_crop_flip", "face_crop_flip", "resize_flip_224"):
    tf = augment.train_transform(name, image_spec.PHOTOS)
    a = tf({"image": jpg, "label": 3, "bbox": np.asarray([10, 10, 60, 70], np.float32)}, np.random.default_rng(7))
    b = tf({"image": jpg, "label": 3, "bbox": np.asarray([10, 10, 60, 70], np.float32)}, np.random.default_rng(7))
    c = tf({"image": jpg, "label": 3, "bbox": np.asarray([10, 10, 60, 70], np.float32)}, np.random.default_rng(8))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (224, 224, 3) and a["label"] == 3
    assert ("bbox" in a) == (name != "face_crop_flip")  # the face transform consumes the box
    assert name == "resize_flip_224" or not np.array_equal(a["image"], c["image"])


def test_eval_resize_center_crop_matches_resize_then_crop():
  arr = np.asarray(Image.open(io.BytesIO(_jpeg(300, 400, 1))).convert("RGB"))
  got = photos.resize_center_crop({"image": arr}, spec=image_spec.PHOTOS, resize=256, crop=224)["image"]
  ref = Image.fromarray(arr).resize((341, 256), Image.BILINEAR)  # torchvision Resize(256): 400·256/300 → 341
  left, top = int(round((341 - 224) / 2)), int(round((256 - 224) / 2))
  ref = image_spec.PHOTOS.normalise(resizing.to_unit(ref.crop((left, top, left + 224, top + 224)), "pil"))
  assert np.abs(got - ref).mean() < 0.02 and got.shape == (224, 224, 3)


def test_draft_decoding_close_to_full_decoding():
  jpg = _jpeg(600, 800, 2)
  full = photos.resize_center_crop({"image": jpg}, spec=image_spec.PHOTOS, draft=False)["image"]
  fast = photos.resize_center_crop({"image": jpg}, spec=image_spec.PHOTOS, draft=True)["image"]
  assert np.abs(full - fast).mean() < 0.05  # normalised units (≈ 1/4 of a grey level per unit · 0.229·255)


def test_face_box_falls_back_to_whole_image():
  assert photos.face_box([0, 0, 0, 0], 50, 40) == (0, 0, 40, 50)
  assert photos.face_box([np.nan, 1, 2, 3], 50, 40) == (0, 0, 40, 50)
  top, left, h, w = photos.face_box([10, 10, 20, 20], 50, 40)
  assert (top, left, h, w) == (7.0, 7.0, 26.0, 26.0)


def test_unknown_eval_augment():
  with pytest.raises(FCTError, match="unknown augment 'nope'; valid: default, resize256_crop224"):
    augment.eval_transform("nope", _data("imagenet", "eval"))


# ---------------------------------------------------------------------------------------------------------------
# Digits and the configs.

def test_digits_splits():
  data = importlib.import_module("configs.digits").get_config("runlocal").stages.old.data
  old, info = sources.get_source(data, "old_train")
  new, _ = sources.get_source(data, "new_train")
  ev, ev_info = sources.get_source(data, "eval")
  assert info.num_classes == 5 and set(old.arrays["label"].tolist()) == set(range(5))
  assert len(new) + len(ev) == 1797 and len(ev) == 497 and ev_info.num_classes == 10
  assert old[0]["image"].shape == (16, 16, 3) and old[0]["image"].dtype == np.uint8


@pytest.mark.parametrize("cfg_name", PAPER_CONFIGS + ("digits",))
def test_config_forms(cfg_name):
  mod = importlib.import_module(f"configs.{cfg_name}")
  full = mod.get_config("data_dir=gs://b/tfds" if cfg_name != "digits" else None)
  # Every Table-1 row: SimCLR side-info, BCT baseline, h without and with ψ; FastFill's h without and with ψ.
  assert full.plan == ["old", "side_info", "new", "bct_new", "transformation_none", "transformation",
                       "transformation_fastfill_none", "transformation_fastfill", "eval"]
  if cfg_name == "digits":  # the reference's proportions: h 0.8 × the backbone epochs, SimCLR as many; no flips
    st = full.stages
    assert st["transformation"]["train"]["epochs"] == 0.8 * st["old"]["train"]["epochs"]
    assert st["side_info"]["train"]["epochs"] == st["old"]["train"]["epochs"] == st["bct_new"]["train"]["epochs"]
    assert st["side_info"]["method"] == "simclr" and not st["side_info"]["simclr"]["views"]["flip"]
    assert st["eval"]["bct"] == "bct_new" and len(st["eval"]["orderings"]) == 8
    assert st["transformation_fastfill"]["method"] == "fastfill"
  else:
    side = full.stages["side_info"]
    if cfg_name == "vggface2":  # Table 3: ArcFace everywhere, the alternate old model as side-information
      assert side["method"] == "alt_old" and side["train"]["optimizer"]["name"] == "momentum"
      assert full.stages["transformation"]["side_info"]["kind"] == "alt_old"
      assert all(full.stages[s]["loss"]["kind"] == "arcface" and full.stages[s]["model"]["head"] == "arcface"
                 for s in ("old", "side_info", "new", "bct_new"))
    else:
      assert side["method"] == "simclr" and side["train"]["optimizer"]["name"] == "lars"
      assert full.stages["transformation"]["side_info"]["kind"] == "simclr"
      assert full.stages["old"]["loss"]["kind"] == "softmax" and full.stages["old"]["model"]["head"] == "linear"
      assert "head" not in side["model"]  # SimCLR's encoder has no classifier
    assert side["split"] == "old_train"
    assert full.stages["transformation"]["side_info"]["stage"] == "side_info"
    assert full.stages["bct_new"]["bct"]["old"] == "old"
    assert full.stages["eval"]["bct"] == "bct_new"
    old = full.stages["old"]
    assert old["data"]["data_dir"] == "gs://b/tfds" and old["train"]["batch_size"] == 1024
    opt = old["train"]["optimizer"]
    assert (opt["name"], opt["lr"], opt["momentum"], opt["weight_decay"], opt["warmup_epochs"]) == (
        "momentum", 1.024, 0.875, 3.0517578125e-5, 5)
    # ArcFace's recipe has no label smoothing.
    assert old["train"]["epochs"] == 100 and old["loss"]["label_smoothing"] == (0.0 if cfg_name == "vggface2" else 0.1)
    h = full.stages["transformation"]
    assert (h["train"]["optimizer"]["name"], h["train"]["optimizer"]["lr"], h["train"]["epochs"]) == (
        "adam", 5e-4, 80)
    for s in full.stages.values():
      assert s["eval_augment"] in augment.EVAL_TRANSFORMS
      assert s.get("augment", "none") in augment.TRAIN_TRANSFORMS
  one = mod.get_config("stage=transformation,runlocal")
  assert one.stage == "transformation" and one.stages[one.stage].kind == "transformation"


@pytest.mark.slow
@pytest.mark.parametrize("cfg_name", PAPER_CONFIGS + ("digits",))
def test_runlocal_end_to_end(cfg_name, tmp_path):
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f"configs.{cfg_name}").get_config("runlocal")
  assert experiment.run(cfg, str(tmp_path)) == list(cfg.plan)
  assert (tmp_path / "results.json").exists()


def test_simclr_views_from_encoded_jpeg():
  """TFDS sources hand over JPEG bytes: the SimCLR two-view transform decodes them (once) like the arrays."""
  img = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")  # lossless, so bytes and array must give identical views
  for spec in (image_spec.SMALL_ARRAYS, image_spec.PHOTOS):
    views = augment.two_view_transform("simclr", spec, out_size=32)
    from_bytes = views({"image": buf.getvalue(), "label": 3}, np.random.default_rng(1))
    from_array = views({"image": img, "label": 3}, np.random.default_rng(1))
    assert from_bytes["view1"].shape == (32, 32, 3) and from_bytes["label"] == 3
    np.testing.assert_array_equal(from_bytes["view1"], from_array["view1"])
    np.testing.assert_array_equal(from_bytes["view2"], from_array["view2"])
