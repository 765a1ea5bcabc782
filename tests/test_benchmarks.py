"""Smoke runs of the benchmark scripts at tiny sizes on the CPU, so the scripts a GPU session runs in its one call
(``benchmarks/gpu_checks.sh``) keep working. Each runs as a user runs it, in its own process, and its JSON is read
back; the assertions are about what the scripts compute and record, not about speed."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, script, *args):
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args, "--out", str(out)],
                        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f"wrote {out}" in proc.stdout
  return json.loads(out.read_text()), proc


def test_train_step_bench(tmp_path):
  dump = tmp_path / "xla_dump"
  result, _ = _run(tmp_path, "train_step_bench.py", "--model", "resnet18", "--batch", "2", "--image_size", "32",
                   "--steps", "1", "--warmup", "1", "--repeats", "1", "--batch_norm", "flax",
                   "--stem_conv", "space_to_depth",
                   f"--xla_flags=--xla_dump_to={dump}")
  j = result["jax"]
  assert j["num_params"] == 11_688_512  # torchvision's ResNet-18 (11,689,512) less the classifier's 1,000 biases
  assert j["images_per_s"] > 0 and math.isfinite(j["final_loss"])
  # --xla_flags reached XLA before its backend started: the dump folder it names was written.
  assert f"--xla_dump_to={dump}" in result["xla_flags"] and any(dump.iterdir())
  # --stem_conv reached the model: the step's stem is a 4×4 conv, and no 7×7 conv is left.
  step_hlo = "".join(p.read_text() for p in dump.glob("*jit__step*before_optimizations.txt"))
  assert "size=4x4" in step_hlo and "size=7x7" not in step_hlo


def test_train_step_bench_refuses_torch_for_other_models(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step_bench.py"), "--model",
                         "mobilenet_v2", "--torch"], cwd=tmp_path, capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and "--torch times ResNet-50 only" in proc.stderr


def test_retrieval_benchmarks_agree_with_the_reference(tmp_path):
  result, _ = _run(tmp_path, "retrieval_bench.py", "--sizes", "300", "--ref-max", "300", "--repeats", "1")
  row = result["rows"][0]
  assert row["n"] == 300
  ours, ref = row["ours"]["metrics"], row["reference"]["metrics"]
  assert (ours["cmc_top1"], ours["cmc_top5"]) == (ref["cmc_top1"], ref["cmc_top5"])
  assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-3)  # percent; the two sum in float32 in different orders
  variants, _ = _run(tmp_path, "retrieval_variants.py", "--n", "300", "--repeats", "1", "--variants",
                     "reduce:0,histogram:0", "--hlo", "reduce:0", "--hlo_dir", str(tmp_path))
  entries = variants["variants"]
  assert all("error" not in e and e["same_as_first"] for e in entries.values()), entries
  assert os.path.getsize(entries["reduce:0"]["hlo"]) > 0


def test_upgrade_bench(tmp_path):
  result, _ = _run(tmp_path, "upgrade_bench.py", "--n", "1024", "--chunk", "256")
  assert result["n"] == 1024 and result["numpy_vs_flax_max_abs_err"] < 1e-4
  assert all(v > 0 for v in result["items_per_s"].values()), result["items_per_s"]


def test_input_bench(tmp_path):
  result, _ = _run(tmp_path, "input_bench.py", "--num-images", "8", "--batch", "4", "--threads", "1", "--height",
                   "48", "--width", "64")
  assert result["num_images"] == 8
  assert all(v > 0 for v in result["images_per_s"].values()), result["images_per_s"]


def test_backfill_bench(tmp_path):
  result, _ = _run(tmp_path, "backfill_bench.py", "--tiny", "--repeats", "1")
  rows = result["rows"]
  assert rows["partial"]["items"] == int(result["budget"] * result["n"]) and rows["full"]["items"] == result["n"]
  assert all(r["items_per_s"] > 0 for r in (rows["partial"], rows["full"])), rows


def test_vectors_build_bench(tmp_path):
  result, _ = _run(tmp_path, "vectors_build_bench.py", "--tiny", "--repeats", "1")
  assert result["n"] == 2000 and result["stored_equals_source"] == {"npy": True, "zarr": True}
  assert all(r["items_per_s"] > 0 for r in result["rows"].values()), result["rows"]
  assert set(result["ratios"]) >= {"npy/np_save items_per_s", "zarr/np_save items_per_s"}


def test_vectors_train_bench(tmp_path):
  result, _ = _run(tmp_path, "vectors_train_bench.py", "--tiny")
  assert set(result["modes"]) == {"device", "host"} and result["tiny"]
  assert all(m["rows_per_s"] > 0 for m in result["modes"].values()), result["modes"]
