r"""FCT (and FastFill) from stored vectors made by any model: no image, no backbone stage.

What a team with its own models has: for a training sample, the old and the new model's embeddings (and, if ψ was
stored at old time, the side-information), and for an evaluation set the same. Write them as a *vector set* — an
``.npz``, or a directory of ``.npy`` files or of zarr arrays, with the fields ``old`` [N, d_old], ``psi`` [N, d_side]
(optional), ``new`` [N, d_new], ``label`` [N] (for FastFill and the evaluation) and ``id`` [N] (optional);
``fct_jax/data/vectors.py`` reads and checks them — and run:

  python -m fct_jax.main --config=configs/vectors.py:train=$V/train,eval=$V/eval,side_dim=128 --workdir=$WD

Config arguments: ``train``, ``eval`` (vector sets); ``side_dim`` (ψ's width; 0: the files hold no ψ, and only the
transformation without side-information is trained); ``classifier`` (the new model's [d_new, C] linear classifier
as ``.npy``, or ``.npz`` with ``kernel`` and ``bias``: adds FastFill's two transformations); ``old_model``,
``new_model``, ``side_model`` (names recorded in gallery stores, so that ``python -m fct_jax.gallery upgrade`` checks
a store built with ``gallery build --from-vectors`` against them); ``epochs``, ``batch_size``, ``lr``, ``inner_dim``
(h's recipe; default the reference's: Adam 5e-4, 80 epochs, batch 1024, inner width 2048); ``epoch_rows`` (rows per
epoch; 0: all); ``stage`` (run one stage). Every field can also be overridden as ``--config.stages.NAME.FIELD=V``.

The plan: ``transformation_none`` (ψ = 0), ``transformation`` (ψ stored; with ``side_dim`` > 0),
``transformation_fastfill_none`` and ``transformation_fastfill`` (with ``classifier``), ``eval`` (the case table
old/old, new/new, h/h, new/h and ``new/h[<kind>]`` per transformation, the backfilling curves of each; the eval set
is query and gallery at once, each query's own item excluded). h trains in the cached-features path (on the devices,
sharded, resumable): the vectors are the features. docs/bring-your-own-embeddings.md walks through it with PyTorch.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage="", train="", eval="", classifier="", side_dim=0, old_model="old",
                       new_model="new", side_model="", epoch_rows=0, epochs=80.0, batch_size=1024, lr=5e-4,
                       inner_dim=2048)
  data = ml_collections.ConfigDict({"name": "vectors", "train": a.train, "eval": a.eval, "classifier": a.classifier,
                                    "old_model": a.old_model, "new_model": a.new_model,
                                    "side_model": a.side_model or ("side" if a.side_dim else ""),
                                    "epoch_rows": a.epoch_rows})
  train = common.train(batch_size=a.batch_size, epochs=a.epochs,
                       optimizer_cfg=common.optimizer("adam", a.lr, weight_decay=3.0517578125e-5, warmup_epochs=5))
  h = dict(data=data, split="train", seed=3, model={"name": "fct_mlp", "inner_dim": a.inner_dim}, train_cfg=train,
           feature_mode="cached")
  stored = dict(side_info_kind="stored", side_info_dim=a.side_dim)
  stages = [common.transformation_stage("transformation_none", **h)]
  compared = ["transformation_none"]
  if a.side_dim:
    stages.append(common.transformation_stage("transformation", **h, **stored))
    compared.append("transformation")
  if a.classifier:
    stages.append(common.transformation_stage("transformation_fastfill_none", **h, method="fastfill"))
    compared.append("transformation_fastfill_none")
    if a.side_dim:
      stages.append(common.transformation_stage("transformation_fastfill", **h, **stored, method="fastfill"))
      compared.append("transformation_fastfill")
  main = "transformation" if a.side_dim else "transformation_none"  # the rows new/h and h/h
  stages.append(common.evaluation_stage("eval", data=data, split="eval", transformation=main,
                                        compare_transformations=compared if len(compared) > 1 else [],
                                        probe_fields=[]))
  return common.experiment("vectors", stages, a.stage)
