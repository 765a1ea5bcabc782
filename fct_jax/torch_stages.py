"""PyTorch weights as fct_jax stages, and stages as PyTorch state dicts (``--import_torch``, ``--export_torch``).

``python -m fct_jax.main --config=CFG:stage=NAME --workdir=DIR --import_torch=FILE`` fills stage ``NAME`` of the
experiment in ``DIR`` with a checkpoint's weights instead of training it (:func:`import_stage`); the other stages
then run, or read it, as if it had been trained here. ``--export_torch=OUT.npz`` writes a finished stage's network
with ml-fct's names and layouts (:func:`export_stage`). Reading and name mapping are :mod:`fct_jax.torch_import`'s;
this module decides which network of a stage has a PyTorch counterpart and where its variables sit, and writes the
stage directory as training would.
"""

import hashlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from fct_jax import artifacts, checkpoint, config_schema, experiment, models
from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.models.resnet import ResNet
from fct_jax.torch_import import find_prefix, from_flax, read_state_dict, to_flax


def _template(module, *inputs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs, train=False))


def _image_input(data_cfg, split: str):
  _, info = sources.get_source(data_cfg, split)
  return info, jnp.zeros((1, info.image_size, info.image_size, 3), jnp.float32)


def stage_model(name: str, cfg) -> Tuple[str, Tuple[str, ...]]:
  """``(family, path)`` of the PyTorch-shaped model in a stage: the ResNet (or FCT MLP) sits at variable path
  ``path`` of the stage's saved model (SimCLR's ``encoder``, input standardisation's ``encoder``).

  Raises:
    FCTError: the stage has no PyTorch counterpart (its kind, side-information method, model or head); checked
      from the config alone, before any file is read or model loaded.
  """
  kind = cfg.kind
  if kind in ("backbone", "side_info"):
    if kind == "side_info" and cfg.method not in ("simclr",) + config_schema.CLASSIFIER_METHODS:
      raise FCTError(f"stage {name!r}: side-information method {cfg.method!r} has no PyTorch counterpart "
                     f"(methods with a ResNet: simclr, {', '.join(config_schema.CLASSIFIER_METHODS)})")
    try:  # the module alone (no variables, no data): is it a ResNet with a linear head?
      net = models.get_model(cfg.model.name, num_classes=0, **artifacts.model_kwargs(cfg.model))
    except (ValueError, TypeError) as e:
      raise FCTError(f"stage {name!r}: cannot build model {cfg.model.name!r}: {e}") from e
    if not isinstance(net, ResNet):
      raise FCTError(f"stage {name!r}: only ResNets have a PyTorch counterpart here, and its model is "
                     f"{type(net).__name__}")
    if net.head != "linear":
      raise FCTError(f"stage {name!r}: its {net.head!r} head has no PyTorch counterpart here (linear heads only)")
    if kind == "backbone":
      return "resnet", ()
    path = (("encoder",) if cfg.method == "simclr" else ())
    return "resnet", path + (("encoder",) if cfg.input_norm == "image" else ())
  if kind == "transformation":
    return "fct_mlp", ()
  raise FCTError(f"stage {name!r} of kind {kind!r} has no weights to import or export (backbone, side_info and "
                 "transformation stages do)")


def _subtree(tree, path):
  """``{collection: tree[...path]}``: the variables of the sub-module at ``path``."""
  for attr in path:
    tree = {col: t[attr] for col, t in tree.items() if attr in t}
  return tree


def _nest(tree, path):
  """The inverse of :func:`_subtree`: ``{collection: {path[0]: {...: tree}}}``."""
  for attr in reversed(path):
    tree = {col: {attr: t} for col, t in tree.items()}
  return tree


def stage_variables(name: str, cfg, ctx, checkpoint_path: str, *, prefix: Optional[str] = None,
                    allow_unused: bool = False) -> Tuple[Any, dict]:
  """The variables to save as stage ``name``'s model, built from a PyTorch checkpoint.

  The model is the one the stage config describes (rebuilt as the stage's own code builds it, so the saved tree
  loads wherever the stage is read); only the ResNet (backbone stages; side-information stages of the methods
  that use one) or the FCT MLP (transformation stages, whose widths come from the finished upstream stages in
  ``ctx.workdir``) is filled from the checkpoint (:func:`read_state_dict`, read once the stage is known to have a
  PyTorch counterpart). A SimCLR stage keeps no projection head (ψ is the encoder's embedding), and a PyTorch
  classifier (``fc``) beside a model without one is left out. A classifier wider than the stage's classes
  (ml-fct's old models have one logit per *new* class) gives its first rows.

  Returns:
    ``(variables, info)``: ``info`` has ``prefix``, ``tensors_used``, ``unused`` (names) and ``note`` (what was
    adapted, or ``""``).
  """
  family, path = stage_model(name, cfg)
  state = read_state_dict(checkpoint_path)
  if cfg.kind == "transformation":
    dims = {k: artifacts.upstream_width(ctx, cfg[k], name) for k in ("old", "new")}
    module = artifacts.build_h(cfg, dims["old"], dims["new"])
    template = _template(module, jnp.zeros((1, dims["old"])), jnp.zeros((1, int(cfg.side_info.dim))))
  else:
    info, x = _image_input(cfg.data, cfg.split)
    module = (artifacts.build_backbone(cfg, info.num_classes) if cfg.kind == "backbone"
              else artifacts.build_side_model(cfg))
    template = _template(module, x)
    if cfg.kind == "side_info" and cfg.method == "simclr":  # the encoder alone
      template = _nest(_subtree(template, ("encoder",)), ("encoder",))
  sub = _subtree(template, path)
  prefix = find_prefix(state, family, prefix)
  dropped, note = [], ""
  if family == "resnet":
    classifier = sub["params"].get("classifier")
    num_classes = np.shape(classifier["kernel"])[-1] if classifier else 0
    fc = {k: v for k, v in state.items() if k.startswith(prefix + "fc.")}
    if not num_classes:  # e.g. SimCLR's encoder: a classifier beside it is not used
      dropped = sorted(fc)
      state = {k: v for k, v in state.items() if k not in fc}
    elif fc and min(np.shape(v)[0] for v in fc.values()) > num_classes:
      # ml-fct: its old models' classifiers are as wide as the new class count (1000 for ImageNet-500); the old
      # split's classes are the first ones of the same label order, so their rows are the first ones.
      wide = np.shape(state[prefix + "fc.weight"])[0] if prefix + "fc.weight" in fc else None
      state = {**state, **{k: v[:num_classes] for k, v in fc.items()}}
      note = f"classifier: the first {num_classes} of the checkpoint's {wide} classes"
  filled, unused = to_flax(state, sub, family, prefix=prefix, allow_unused=allow_unused)
  used = sum(1 for _ in jax.tree_util.tree_leaves(filled))
  return _nest(filled, path), {"prefix": prefix, "tensors_used": used, "unused": dropped + unused, "note": note}




def stage_state_dict(name: str, cfg, load_variables: Callable[[], Any], *,
                     linear_as_conv: bool = True) -> Dict[str, np.ndarray]:
  """The PyTorch state dict of a finished stage's network (the ResNet or FCT MLP in its saved variables).

  ``load_variables()`` reads the stage's saved variables; it is called once the stage is known to have a PyTorch
  counterpart (:func:`stage_model`).
  """
  family, path = stage_model(name, cfg)
  return from_flax(_subtree(load_variables(), path), family, linear_as_conv=linear_as_conv)


def _single_stage(config, what: str):
  """``(name, stage_config)`` of the one stage a config selects, in a single-process run; else a one-line error."""
  todo = experiment.stage_configs(config)
  if len(todo) != 1 or not config.stage:
    raise FCTError(f"{what} one stage: select it with --config=FILE:stage=NAME")
  if jax.process_count() > 1:
    raise FCTError("run this in a single process (it reads and writes one stage)")
  return todo[0]


def import_stage(config: ml_collections.ConfigDict, workdir: str, path: str, *, prefix: Optional[str] = None,
                 allow_unused: bool = False) -> dict:
  """Fills the one selected stage from a PyTorch checkpoint (read by :mod:`fct_jax.torch_import`) instead of training.

  The stage directory gets what training would leave (``config.json``, ``model/``, the finished marker) plus
  ``imported.json`` (the file, its SHA-256, the tensors used and left out); later runs of the plan skip it and
  read it like a trained stage. Everything is checked before anything is written: an unfinished or finished
  stage directory is refused, as is a checkpoint that does not fit the stage config's model.

  Args:
    config: experiment config with one stage selected (``--config=...:stage=NAME``) or a single-stage config.
    workdir: experiment directory (created if missing); a transformation stage needs its upstream stages there.
    path: the checkpoint (TorchScript, ``torch.save`` zip or ``.npz``; see ``torch_import.read_state_dict``).
    prefix: the model's tensor-name prefix in the checkpoint when it holds several models.
    allow_unused: import even though some of the checkpoint's tensors have no place in the model.

  Returns:
    the ``imported.json`` record.
  """
  name, scfg = _single_stage(config, "an import fills")
  experiment.validate_stages([(name, scfg)])
  workdir = checkpoint.abspath(workdir)
  stage_dir = checkpoint.join(workdir, name)
  experiment.check_workdir(config, workdir)
  if checkpoint.exists(stage_dir):
    what = "finished" if checkpoint.is_done(stage_dir) else "started"
    raise FCTError(f"stage {name!r} in {workdir} is {what} already ({stage_dir}); nothing was imported")
  variables, info = stage_variables(name, scfg, artifacts.Context(workdir=workdir), path, prefix=prefix,
                                                 allow_unused=allow_unused)
  record = {"source": checkpoint.abspath(path), "sha256": _sha256(path), **info}
  experiment.open_workdir(config, workdir)
  experiment.open_stage(name, scfg, stage_dir)
  checkpoint.save_model(stage_dir, variables)
  checkpoint.write_json(checkpoint.join(stage_dir, checkpoint.IMPORTED), record)
  checkpoint.mark_done(stage_dir)
  return record


def export_stage(config: ml_collections.ConfigDict, workdir: str, out: str, *, linear_as_conv: bool = True) -> int:
  """Writes the selected finished stage's network as a PyTorch state dict in an ``.npz`` file.

  The names and layouts are ml-fct's (``torch_import.from_flax``): load it with
  ``model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(out).items()})`` into ml-fct's ResNet or
  ``MLP_BN_SIDE_PROJECTION`` of the same widths (``linear_as_conv=False``: torchvision's Linear classifier).
  For a SimCLR stage that is the encoder (ψ). ``out`` must not exist.

  Returns:
    the number of tensors written.
  """
  name, scfg = _single_stage(config, "an export writes")
  workdir = checkpoint.abspath(workdir)
  stage_dir = checkpoint.join(workdir, name)
  if not checkpoint.is_done(stage_dir):
    raise FCTError(f"stage {name!r} is not finished in {workdir}; nothing to export")
  experiment.check_stage_config(name, scfg, stage_dir)
  if not str(out).endswith(".npz"):
    raise FCTError(f"export to a .npz file, not {out}")
  if epath.Path(out).exists():
    raise FCTError(f"{out} exists; choose another path (nothing was overwritten)")
  state = stage_state_dict(name, scfg, lambda: checkpoint.load_model(stage_dir),
                                        linear_as_conv=linear_as_conv)
  tmp = epath.Path(str(out)[:-len(".npz")] + ".tmp.npz")
  with tmp.open("wb") as f:
    np.savez(f, **state)
  tmp.rename(out)
  return len(state)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
