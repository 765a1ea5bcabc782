"""Input pipeline benchmark: images/s of the ImageNet training pipeline on synthetic JPEGs, per CPU core.

Writes N synthetic ImageNet-sized JPEGs (default 500×375, quality 90, smooth content plus noise, ~60–110 kB as
ImageNet's) into a temporary TFDS array_record dataset (no TensorFlow needed), then reads it the way training
does: ``tfds.data_source`` → :class:`fct_jax.data.tfds_source.TfdsSource` → grain → per-example transform.

Peers, side by side in one run (ratios matter on shared CPUs, absolute numbers less):
  transform/draft     our train transform alone (PIL draft decode + random resized crop 224 + flip + normalise)
  transform/full      the same with a full-size decode — what torchvision's RandomResizedCrop on PIL (ml-fct) does
  pipeline/T threads  the whole grain pipeline (read + deserialise + transform + batch) with T worker threads
  eval/draft, eval/full  resize 256 + centre crop 224

  python benchmarks/input_bench.py --num-images 256 --threads 1,2 --out /tmp/input_bench.json
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.bench_io import write_json  # noqa: E402


def synthetic_jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack([np.sin(x / rng.uniform(5, 40)), np.cos(y / rng.uniform(5, 40)),
                   np.sin((x + y) / rng.uniform(5, 40))], -1) * 80 + 128
  img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def build_dataset(data_dir: str, n: int, h: int, w: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class FctSyntheticJpegs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(n):
        yield i, {"image": io.BytesIO(synthetic_jpeg(rng, h, w)), "label": i % 1000}

  FctSyntheticJpegs(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "fct_synthetic_jpegs"


def rate(fn, n: int) -> float:
  t = time.perf_counter()
  fn()
  return n / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num-images", type=int, default=256)
  p.add_argument("--height", type=int, default=375)
  p.add_argument("--width", type=int, default=500)
  p.add_argument("--threads", default="1,2")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.num_images < args.batch:
    p.error(f"--num-images {args.num_images} is less than one --batch ({args.batch}): the pipeline would time nothing")

  from fct_jax.data import augment, image_spec, photos, pipeline, tfds_source  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as d:
    name = build_dataset(d, args.num_images, args.height, args.width)
    ds = tfds_source.open_split(name, "train", d)
    src = tfds_source.TfdsSource(ds, name=name)
    n = len(src)
    examples = [src[i] for i in range(n)]
    jpeg_kb = float(np.mean([len(e["image"]) for e in examples])) / 1024
    results = {}
    for tag, draft in (("draft", True), ("full", False)):
      train_tf = functools.partial(photos.inception_crop_flip, spec=image_spec.PHOTOS, draft=draft)
      eval_tf = functools.partial(photos.resize_center_crop, spec=image_spec.PHOTOS, draft=draft)
      results[f"transform/{tag}"] = rate(lambda: [train_tf(e, np.random.default_rng(i))
                                                  for i, e in enumerate(examples)], n)
      results[f"eval/{tag}"] = rate(lambda: [eval_tf(e) for e in examples], n)
    results["read+deserialise"] = rate(lambda: [src[i] for i in range(n)], n)
    steps = n // args.batch
    for t in (int(x) for x in args.threads.split(",")):
      def run():
        for _ in pipeline.train_batches(src, global_batch_size=args.batch, seed=0, start_step=0, num_steps=steps,
                                        transform=augment.train_transform("inception_crop_flip", image_spec.PHOTOS),
                                        num_threads=t,
                                        process_index=0, process_count=1):
          pass
      run_rate = rate(run, steps * args.batch)
      results[f"pipeline/{t} threads"] = run_rate
      results[f"pipeline/{t} threads per thread"] = run_rate / t

  cores = os.cpu_count()
  print(f"{n} synthetic {args.width}×{args.height} JPEGs (mean {jpeg_kb:.0f} kB), {cores} CPU cores visible, "
        f"{platform.processor() or platform.machine()}")
  print(f"{'peer':<34}{'images/s':>10}")
  for k, v in results.items():
    print(f"{k:<34}{v:>10.1f}")
  speedup = results["transform/draft"] / results["transform/full"]
  print(f"draft / full decode speed-up (train transform): {speedup:.2f}×")
  if args.out:
    write_json(args.out, {"num_images": n, "jpeg_kb": jpeg_kb, "size": [args.height, args.width], "cpu_count": cores,
                          "images_per_s": results}, indent=1)


if __name__ == "__main__":
  main()
