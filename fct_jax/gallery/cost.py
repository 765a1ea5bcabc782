"""Per-example cost of a model update (the paper's Figure 3): backfilling vs BCT vs FCT.

* **Backfilling** re-embeds every gallery image with φ_new: the MACs of the new backbone at image resolution, and
  the images must be kept (H × W × 3 bytes of uint8 pixels).
* **BCT**: φ_new is trained to be compatible; nothing is recomputed or kept: 0 and 0.
* **FCT**: the transformation h runs on stored vectors: the MACs of h, and ψ must be kept beside each embedding
  (d_side × bytes of the storage dtype).

MACs come from XLA's cost analysis of the compiled models (``jit(f).lower(...).compile().cost_analysis()``),
not from formulas: ``flops / 2``, since XLA counts a multiply-add as two flops. That count also includes the
elementwise work (BatchNorm, ReLU) as flops, so it is slightly above the pure multiply-add count. Compiled (not
merely lowered) so that outputs we do not need — the classifier's logits — are removed by dead-code
elimination, as they would be in a deployed embedder.
"""

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from fct_jax import artifacts, checkpoint, config_schema, models
from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.gallery import loader
from fct_jax.gallery import store as store_lib
from fct_jax.gallery.upgrade import Transform


def xla_flops(fn, *args) -> float:
  """Flops per call of ``jax.jit(fn)(*args)`` from XLA's cost analysis (args may be ShapeDtypeStructs)."""
  return flops_of(jax.jit(fn).lower(*args).compile().cost_analysis())


def flops_of(analysis) -> float:
  """The flops of a ``cost_analysis()`` result (of a compiled or a lowered computation)."""
  if isinstance(analysis, (list, tuple)):  # older jax returns one dict per computation
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  if flops is None:
    raise FCTError("XLA's cost analysis reported no flops on this backend")
  return float(flops)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                      if not isinstance(x, jax.ShapeDtypeStruct) else x, tree)


def backbone_macs(stage_dir: str, image_size: int) -> float:
  """MACs of one image through a backbone stage's embedding at ``image_size`` (its saved variables' shapes)."""
  cfg = config_schema.resolve(checkpoint.read_json(os.path.join(stage_dir, "config.json")))
  variables = checkpoint.load_model(stage_dir)
  # The classifier width from the saved variables: no data set needs to be present to build the module.
  kernels = [np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(variables)
             if "classifier" in jax.tree_util.keystr(p).lower() and np.ndim(x) == 2]
  num_classes = kernels[0][1] if kernels else 0
  module = artifacts.build_backbone(cfg, num_classes)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return xla_flops(lambda v, im: module.apply(v, im, train=False)["embedding"], _abstract(variables), x) / 2


def transformation_macs(t) -> float:
  """MACs of h (and g) for one stored item of a :class:`~fct_jax.gallery.upgrade.Transform`."""
  old = jax.ShapeDtypeStruct((1, t.old_dim), jnp.float32)
  side = jax.ShapeDtypeStruct((1, t.side_dim), jnp.float32)
  return xla_flops(lambda v, o, s: t.apply(v, o, s), _abstract(t.variables), old, side) / 2


def paper_report(image_size: int = 224, dtype: str = "float32") -> dict:
  """Figure 3's setting without any trained workdir: ResNet50-128 at ``image_size`` vs h(128, 128, 128, 2048).

  Shapes only (``jax.eval_shape`` of the initialisers): cost analysis needs no weights.
  """
  net = models.get_model("resnet50", num_classes=1000, embedding_dim=128, last_nonlin=True)
  key = jax.random.key(0, impl="rbg")
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  nv = jax.eval_shape(lambda: net.init({"params": key}, jnp.zeros(x.shape), train=False))
  h = models.FCTTransformation(old_dim=128, side_dim=128, new_dim=128, inner_dim=2048)
  hv = jax.eval_shape(lambda: h.init({"params": key}, jnp.zeros((1, 128)), jnp.zeros((1, 128))))
  t = Transform(name="fct_mlp(128,128,128,2048)", apply=lambda v, o, s: (h.apply(v, o, s)["embedding"], None),
                variables=hv, old_dim=128, side_dim=128, new_dim=128, fingerprint="", expects={}, produces={})
  rows = [
      {"method": "backfilling", "macs": xla_flops(lambda v, im: net.apply(v, im, train=False)["embedding"], nv, x) / 2,
       "storage_bytes": image_size * image_size * 3},
      {"method": "BCT", "macs": 0.0, "storage_bytes": 0},
      {"method": "FCT", "macs": transformation_macs(t), "storage_bytes": 128 * store_lib.DTYPES[dtype].itemsize},
  ]
  return {"rows": rows, "image_size": image_size, "new_model": "resnet50-128", "transformation": t.name,
          "dims": {"old": 128, "side": 128, "new": 128}, "side_info_dtype": dtype,
          "source": "XLA cost analysis (compiled), MACs = flops / 2"}


def _image_size(new_cfg, stage_dir: str) -> int:
  """The new model's input size: its data block's ``image_size`` when it has one, else its dataset's."""
  if "image_size" in new_cfg.data and new_cfg.data.image_size:
    return int(new_cfg.data.image_size)
  try:
    return int(sources.get_source(new_cfg.data, new_cfg.split)[1].image_size)
  except Exception as e:  # data not prepared here
    raise FCTError(f"cannot tell the image size of {stage_dir}'s data ({type(e).__name__}); pass --image-size"
                   ) from e


def cost_report(transformation_dir: str, *, image_size: Optional[int] = None, image_bytes: int = 1,
                dtype: str = "float32") -> dict:
  """Figure 3's numbers for one transformation stage and the backbone it maps to.

  Args:
    transformation_dir: EXPERIMENT_DIR/NAME of a finished transformation stage.
    image_size: backfilling resolution (default: the new model's data config).
    image_bytes: bytes per pixel channel of a kept image (1 = uint8).
    dtype: storage dtype of ψ.

  Returns:
    ``{"rows": [{"method", "macs", "storage_bytes"}], ...}`` per example.
  """
  if dtype not in store_lib.DTYPES:
    raise FCTError(f"unknown dtype {dtype!r}; valid: {', '.join(store_lib.DTYPES)}")
  t = loader.load_transformation(transformation_dir, needed_by="gallery cost")
  exp, _ = loader.split_stage_dir(transformation_dir)
  new_stage = t.produces["embedding"]["stage"]
  new_dir = os.path.join(exp, new_stage)
  new_cfg = artifacts.stage_config(artifacts.Context(workdir=exp), new_stage, "gallery cost")
  size = image_size or _image_size(new_cfg, new_dir)
  rows = [
      {"method": "backfilling", "macs": backbone_macs(new_dir, size), "storage_bytes": size * size * 3 * image_bytes},
      {"method": "BCT", "macs": 0.0, "storage_bytes": 0},
      {"method": "FCT", "macs": transformation_macs(t),
       "storage_bytes": t.side_dim * store_lib.DTYPES[dtype].itemsize},
  ]
  return {"rows": rows, "image_size": size, "new_model": new_cfg.model.name, "transformation": t.name,
          "dims": {"old": t.old_dim, "side": t.side_dim, "new": t.new_dim}, "side_info_dtype": dtype,
          "source": "XLA cost analysis (compiled), MACs = flops / 2"}


def format_table(rep: dict) -> str:
  lines = [f"per-example cost of the update (backfilling: {rep['new_model']} at {rep['image_size']}px; "
           f"FCT: {rep['transformation']} {rep['dims']})",
           f"{'method':<12} {'MACs':>14} {'storage (KB)':>13}"]
  for r in rep["rows"]:
    lines.append(f"{r['method']:<12} {r['macs']:>14,.0f} {r['storage_bytes'] / 1024:>13.3f}")
  b, f = rep["rows"][0], rep["rows"][2]
  if f["macs"] > 0:
    lines.append(f"backfilling / FCT: {b['macs'] / f['macs']:.1f}x MACs, "
                 f"{b['storage_bytes'] / max(f['storage_bytes'], 1):.1f}x storage")
  return "\n".join(lines)


def save(rep: dict, out_dir: str):
  """Writes ``cost.json`` and ``cost.png`` (two panels: MACs on a log axis with 0, storage in KB)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  jpath, ppath = os.path.join(out_dir, "cost.json"), os.path.join(out_dir, "cost.png")
  with open(jpath, "w") as f:
    json.dump(rep, f, indent=2)
  names = [r["method"] for r in rep["rows"]]
  colors = ["tab:gray", "tab:blue", "tab:orange"]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 2.8))
  macs = [r["macs"] for r in rep["rows"]]
  a1.barh(names, macs, color=colors)
  # As in the paper, 0 is shown on the log axis: a symmetric-log scale with a linear region below 1 MAC.
  a1.set_xscale("symlog", linthresh=1)
  a1.set_xlabel("MACs per example")
  kb = [r["storage_bytes"] / 1024 for r in rep["rows"]]
  a2.barh(names, kb, color=colors)
  a2.set_xscale("symlog", linthresh=0.1)
  a2.set_xlabel("extra storage per example (KB)")
  for ax, vals in ((a1, macs), (a2, kb)):
    for y, v in enumerate(vals):
      ax.text(v, y, f" {v:,.3g}", va="center", fontsize=8)
  fig.suptitle(f"update cost: backfilling ({rep['new_model']} @ {rep['image_size']}px) vs BCT vs FCT", fontsize=9)
  fig.tight_layout()
  fig.savefig(ppath, dpi=120)
  plt.close(fig)
  return [jpath, ppath]
