"""FCT from stored vectors is FCT's own method: the demo's cached-mode features, exported to files, train the same h
bit for bit and give the same case table; the vectors plan resumes bit-identically after a kill, reads npy and zarr
alike, trains FastFill with a given classifier, and refuses a plan whose files lack what it asks for."""

import copy
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import common, demo
from configs import vectors as vectors_config
from fct_jax import checkpoint, experiment
from fct_jax.data import vectors
from fct_jax.errors import FCTError
from fct_jax.gallery import export

STAGES = ["old", "side_info", "new", "transformation", "eval"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """The runlocal demo's old, ψ, new, h (cached features, SimCLR ψ) and eval, and their export."""
  wd = str(tmp_path_factory.mktemp("demo_vec"))
  config = demo.get_config("runlocal")
  config.plan = STAGES
  config.stages.eval.compare_transformations = []
  config.stages.eval.bct = ""
  config.stages.eval.orderings = []
  experiment.run(config, wd)
  out = str(tmp_path_factory.mktemp("exported"))
  record = export.export_vectors(wd, out, transformation="transformation", eval_stage="eval")
  return wd, out, record, config


def _vector_plan(config, out, record, train_path=None, **h_changes):
  """The demo's transformation and eval stage configs, moved onto the exported vectors (same recipe and seed)."""
  data = {"name": "vectors", "train": train_path or os.path.join(out, "train"), "eval": os.path.join(out, "eval"),
          "classifier": os.path.join(out, "classifier.npz"), "epoch_rows": record["epoch_rows"]}
  h = copy.deepcopy(config.stages.transformation.to_dict())
  h.update(data=data, split="train", side_info={"kind": "stored", "dim": record["side_info_dim"], "stage": ""},
           **h_changes)
  ev = copy.deepcopy(config.stages.eval.to_dict())
  ev.update(data=data, split="eval", probe_fields=[])
  return common.experiment("vectors", [ml_collections.ConfigDict(h), ml_collections.ConfigDict(ev)])


def _params(d):
  return jax.tree.map(np.asarray, checkpoint.load_model(d))


def test_export_holds_what_h_trained_on(exported):
  wd, out, record, _ = exported
  train = vectors.open_vectors(os.path.join(out, "train"), need=("old", "psi", "new", "label"))
  assert train.num_rows == record["views"] * record["epoch_rows"]
  np.testing.assert_array_equal(train.load("old"), np.load(os.path.join(wd, "transformation", "features", "old.npy")))
  ev = vectors.open_vectors(os.path.join(out, "eval"), need=("old", "psi", "new", "label", "id"))
  assert ev.dim("psi") == record["side_info_dim"] == 8
  assert json.load(open(os.path.join(out, "export.json")))["classifier"]
  with pytest.raises(FCTError, match="already holds an export"):
    export.export_vectors(wd, out)


def test_vectors_plan_equals_the_cached_transformation(exported, tmp_path):
  wd, out, record, config = exported
  vwd = str(tmp_path / "vec")
  experiment.run(_vector_plan(config, out, record), vwd)
  # h: the same variables, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, _params(os.path.join(vwd, "transformation")),
               _params(os.path.join(wd, "transformation")))
  # The case table: the same numbers (the eval vectors are the demo's eval embeddings).
  ours = json.load(open(os.path.join(vwd, "results.json")))["cases"]
  theirs = json.load(open(os.path.join(wd, "results.json")))["cases"]
  assert list(ours) == list(theirs) and ours == theirs


def test_vectors_plan_resumes_bit_identical_and_reads_zarr(exported, tmp_path):
  wd, out, record, config = exported
  # The training vectors as zarr arrays: the same h.
  train = vectors.open_vectors(os.path.join(out, "train"), need=("old", "psi", "new", "label"))
  zpath = str(tmp_path / "train_zarr")
  vectors.save_vectors(zpath, {k: train.load(k) for k in ("old", "psi", "new", "label")}, fmt="zarr")
  plan = _vector_plan(config, out, record, train_path=zpath, **{"train": dict(config.stages.transformation.train,
                                                                             steps=4, checkpoint_every_steps=1)})
  plan.plan = ["transformation"]
  killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
  experiment.run(plan, killed, stop_at_step=2)
  assert not checkpoint.is_done(os.path.join(killed, "transformation"))
  experiment.run(plan, killed)
  experiment.run(plan, whole)
  jax.tree.map(np.testing.assert_array_equal, _params(os.path.join(killed, "transformation")),
               _params(os.path.join(whole, "transformation")))


def test_fastfill_on_vectors_and_refusals(exported, tmp_path):
  wd, out, record, config = exported
  plan = _vector_plan(config, out, record, method="fastfill")
  plan.plan = ["transformation"]
  experiment.run(plan, str(tmp_path / "ff"))
  params = _params(os.path.join(tmp_path, "ff", "transformation"))["params"]
  assert params["uncertainty"]["kernel"].shape == (8, 1)
  # Files without ψ, a plan that asks for it: one line, before training.
  nopsi = str(tmp_path / "nopsi")
  train = vectors.open_vectors(os.path.join(out, "train"), need=("old", "new"))
  vectors.save_vectors(nopsi, {k: train.load(k) for k in ("old", "new")}, fmt="npy")
  plan = _vector_plan(config, out, record, train_path=nopsi)
  plan.plan = ["transformation"]
  with pytest.raises(FCTError, match="psi") as e:
    experiment.run(plan, str(tmp_path / "nopsi_wd"))
  assert "\n" not in str(e.value)
  # A ψ width that is not side_info.dim.
  plan = _vector_plan(config, out, record)
  plan.stages.transformation.side_info.dim = 4
  plan.plan = ["transformation"]
  with pytest.raises(FCTError, match="side_info.dim=8"):
    experiment.run(plan, str(tmp_path / "width_wd"))


def test_vectors_config_plans():
  c = vectors_config.get_config("train=/a,eval=/b")
  assert list(c.plan) == ["transformation_none", "eval"] and c.stages.eval.transformation == "transformation_none"
  c = vectors_config.get_config("train=/a,eval=/b,side_dim=16,classifier=/k.npy")
  assert list(c.plan) == ["transformation_none", "transformation", "transformation_fastfill_none",
                          "transformation_fastfill", "eval"]
  assert c.stages.transformation.side_info.kind == "stored" and c.stages.transformation.side_info.dim == 16
  assert c.stages.transformation_fastfill.method == "fastfill" and c.stages.eval.transformation == "transformation"
  assert c.stages.transformation.train.optimizer.lr == 5e-4 and c.stages.transformation.model.inner_dim == 2048


def test_vectors_stream_from_the_files_without_loading_them(exported, tmp_path, monkeypatch):
  """train.arrays_on_device=False: the rows are gathered from the (memory-mapped) files step by step; nothing loads a
  float field whole, and h is the device path's h (the same batches, the same math)."""
  wd, out, record, config = exported
  train = dict(config.stages.transformation.train, steps=4, steps_per_call=1)
  plan = _vector_plan(config, out, record, **{"train": train})
  plan.plan = ["transformation"]
  experiment.run(plan, str(tmp_path / "device"))
  loaded = []
  real_load = vectors.VectorSet.load
  monkeypatch.setattr(vectors.VectorSet, "load", lambda self, f, *a, **k: loaded.append(f) or real_load(self, f, *a, **k))
  plan = _vector_plan(config, out, record, **{"train": dict(train, arrays_on_device=False)})
  plan.plan = ["transformation"]
  experiment.run(plan, str(tmp_path / "host"))
  assert not {"old", "psi", "new"} & set(loaded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _params(os.path.join(tmp_path, "host", "transformation")),
               _params(os.path.join(tmp_path, "device", "transformation")))
