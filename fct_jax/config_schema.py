"""The stage config schema: every field of every stage kind, and its default, written once.

A stage config (``config.stages.NAME``) is resolved before anything runs: :func:`resolve` deep-merges the given
fields over the defaults of the stage's ``kind`` (and, for ``data``, of its dataset ``data.name``), refuses an
unknown kind, an unknown field or a missing required one with a one-line :class:`ConfigError` naming the valid
ones, and returns the complete config. Resolving is idempotent, and a stage's ``config.json`` holds exactly its
resolved config.

A field added later gets its default here (and :data:`SCHEMA_VERSION` goes up): resolving an older saved
``config.json`` fills the field with the value its absence meant, so an old workdir still matches a config that
spells the default out. That value must therefore be what the code did before the field existed.

One kind of block is not checked field by field: ``model`` (the keyword arguments of a Flax module, whose defaults
live in the module; only ``head`` of a classifier's model is filled here, because the stage checks it against the
loss). The config files import this module, so it imports neither jax nor numpy.
"""

import copy
from typing import Any, Mapping

import ml_collections

from fct_jax.errors import FCTError

SCHEMA_VERSION = 3  # 2: the evaluation stage's ``orderings``; 3: FastFill (``method``, ``fastfill``, ``report``'s
# ``backfill_orderings``, the i/21 backfilling grid)

# The values of the fields with a fixed set of them (the library imports these: config files import only this module,
# so that no jax is imported at config time). ``CLASSIFIER_METHODS``: the side-information methods that train a
# classifier (an alternate old model), whose head and loss are checked like a backbone's.
LOSS_KINDS = ("softmax", "arcface")
INPUT_NORMS = ("none", "image")
CLASSIFIER_METHODS = ("alt_old", "alt_old_mixup")
FEATURE_MODES = ("online", "cached")
# How a transformation is trained: ``fct`` (the L2 loss, plain h) or ``fastfill`` (Jaeckle et al., ICLR 2023: h with
# an uncertainty head, the new model's frozen classifier on h, the uncertainty-weighted loss).
TRANSFORMATION_METHODS = ("fct", "fastfill")
# The methods of a side_info stage, and ψ of a transformation: ``none`` (zeros), ``old`` (ψ := φ_old, the official
# FastFill code's "no side-info"), ``stored`` (ψ read from the vector files of a plan on vectors) or a side_info
# stage's method.
SIDE_INFO_METHODS = ("simclr", "autoencoder", "alt_old", "alt_old_mixup")
SIDE_INFO_KINDS = ("none", "old", "stored") + SIDE_INFO_METHODS
# Orders in which a gallery is backfilled (fct_jax.retrieval.backfill): ``sigma`` needs h's uncertainty head.
BACKFILL_ORDERINGS = ("random", "sigma", "distance")


class ConfigError(FCTError, ValueError):
  """A stage config that does not fit the schema (a ValueError too: config files raise it while loading)."""


class Required:
  """A field without a default: the stage config must give it (as a ``kind``, e.g. ``float``, when it has one)."""

  def __init__(self, kind=None):
    self.kind = kind

  def __repr__(self):
    return "<required>"


class Free(dict):
  """A block whose fields are not checked: the defaults it holds are filled, any other field is kept."""


OPTIMIZER = {"name": Required(str), "lr": Required(float), "weight_decay": 0.0, "schedule": "cosine",
             "warmup_epochs": 0.0, "warmup_steps": 0, "grad_clip_norm": 0.0, "momentum": 0.9, "b1": 0.9,
             "b2": 0.999, "eps": 1e-8, "trust_coefficient": 0.001}

# ``steps_per_call`` and ``arrays_on_device`` apply only to data held as arrays (the transformation's cached
# features): optimizer steps per jitted call (0: train_lib's default) and whether those arrays live on the devices.
TRAIN = {"batch_size": Required(int), "epochs": Required(float), "steps": 0, "optimizer": OPTIMIZER,
         "log_every_steps": 50, "eval_every_steps": 0, "checkpoint_every_steps": 500, "keep_checkpoints": 2,
         "num_data_threads": 2, "steps_per_call": 0, "arrays_on_device": True}

# ArcFace's s = 64, m = 0.5; ``kind`` "arcface" needs ``model.head="arcface"`` (the stage refuses a mismatch).
LOSS = {"kind": "softmax", "label_smoothing": 0.1, "arcface_scale": 64.0, "arcface_margin": 0.5}

# SimCLR's two-view augmentation (``simclr.views``; fct_jax.data.simclr_views.simclr_view documents each): the
# SimCLR paper's CIFAR recipe (jitter strength 0.5, no blur); ``out_size`` 0 keeps the image size, ``max_hue`` < 0
# means 0.2 × the jitter strength, ``rotation`` (degrees) and ``gamma`` (≥ 1) are ours, off by default.
SIMCLR_VIEWS = {"out_size": 0, "crop_scale": (0.08, 1.0), "flip": True, "jitter_strength": 0.5, "jitter_prob": 0.8,
                "grayscale_prob": 0.2, "blur_prob": 0.0, "rotation": 0.0, "max_hue": -1.0, "gamma": 1.0}

CLASSIFIER_MODEL = Free({"name": Required(str), "head": "linear"})
MODEL = Free({"name": Required(str)})

_TFDS = {"data_dir": "", "tfds_name": "", "label_cache_dir": "", "mock_num_examples": 0,
         "image_size": 0, "old_classes": 0, "eval_per_class": 0, "eval_subsample_seed": 0}
# The data block per dataset (``data.name``). TFDS datasets: ``tfds_name``, ``image_size`` and ``old_classes``
# "" / 0 mean the dataset's own (fct_jax.data.sources.TFDS_DATASETS); ``mock_num_examples`` > 0 reads
# ``tfds.testing.mock_data`` (runlocal); ``eval_per_class`` > 0 evaluates on that many random images per class.
DATA = {
    "shapes": {"num_old_train": Required(int), "num_new_train": Required(int), "num_eval": Required(int),
               "image_size": Required(int), "num_old_shapes": Required(int), "seed": Required(int)},
    "digits": {"image_size": 16, "old_classes": 5, "num_eval": 497, "seed": 0},
    "imagenet2012": _TFDS, "places365": _TFDS, "cifar100": _TFDS,
    "vggface2": dict(_TFDS, eval_per_class=50),  # 50 images of each of the 500 test subjects
    # Stored vectors made by any model (fct_jax.data.vectors; configs/vectors.py): ``train`` / ``eval`` are vector
    # sets (an .npz, or a directory of .npy files or zarr arrays: fields old, psi, new, label, id) and the splits'
    # names; ``classifier`` the new model's [d_new, C] classifier (FastFill's discriminative term); the model names
    # are recorded in gallery stores; ``epoch_rows`` > 0: rows per epoch (e.g. the images when the rows are K
    # augmented views of each; 0: every row).
    "vectors": {"train": "", "eval": "", "classifier": "", "old_model": "old", "new_model": "new", "side_model": "",
                "epoch_rows": 0},
}

_COMMON = {"name": Required(str), "kind": Required(str), "data": Required(dict), "split": Required(str),
           "eval_batch_size": 256, "eval_augment": "default"}
_TRAINED = dict(_COMMON, seed=Required(int), model=MODEL, train=TRAIN, augment="none", prng_impl="rbg")

# Report options of the evaluation stages (fct_jax.retrieval.summary.summarize): the last CMC cut-off of the curves,
# the backfilled fractions of the partial-backfilling curves (FastFill's protocol: i/21, i = 0…21, the first
# ⌊f·n⌋ items of an ordering backfilled) and the orderings drawn for every transformed gallery (``sigma`` only where
# h has an uncertainty head).
BACKFILL_GRID = [i / 21 for i in range(22)]
REPORT = {"max_k": 20, "backfill_fractions": BACKFILL_GRID, "backfill_orderings": ["random", "sigma", "distance"]}

# FastFill's loss (``method="fastfill"``; the official recipe): per item ℓ = mu_sim · mean_d (h − φ_new)² + mu_disc ·
# label-smoothed CE(κ_new(h), y) through the new model's frozen classifier κ_new, total mean(½ e^{−s} ℓ + mu_unc · s)
# with s = log σ² from h's uncertainty head of width ``sigma_dim`` (1, or the embedding width; 0: no head, mean(ℓ)).
FASTFILL = {"sigma_dim": 1, "mu_sim": 1.0, "mu_disc": 1.0, "mu_unc": 0.5, "label_smoothing": 0.1}

# Experiment-level fields (beside ``experiment``, ``plan``, ``stages``, ``stage``; not stage fields): ``seeds``, how
# many seed sets the plan runs (1: the plan as written; N > 1: once per seed set in WORKDIR/seed_<i>/, then the
# combined report; fct_jax.experiment).
EXPERIMENT = {"seeds": 1}

KINDS = {
    "backbone": dict(_TRAINED, model=CLASSIFIER_MODEL, loss=LOSS, bct={"old": "", "weight": 1.0}, eval_split=""),
    "side_info": dict(
        _TRAINED, method="simclr", input_norm="none", loss=LOSS, mixup={"alpha": 0.2}, eval_split="",
        simclr={"projection": {"hidden_dim": 2048, "out_dim": 128, "num_layers": 2}, "temperature": 0.1,
                "augment": "simclr",
                "views": SIMCLR_VIEWS}),
    "transformation": dict(_TRAINED, old="old", new="new", side_info={"kind": "none", "dim": 0, "stage": ""},
                           bn_eval_after=0.5, feature_mode="online", cache_views=1, method="fct",
                           fastfill=FASTFILL),
    # ``orderings``: claims "case_a > case_b" on CMC top-1 (or "gallery:ordering > gallery:ordering" on the
    # backfilling curves' AUC top-1) that the multi-seed report checks seed by seed.
    "evaluation": dict(_COMMON, old="old", new="new", bct="", transformation="transformation",
                       compare_transformations=[], probe_fields=["label"], paper_table="", report=REPORT,
                       orderings=[]),
    # ``transformation``: the stage whose update cost the report shows ("" for none: a sequence has several).
    "sequence_evaluation": dict(_COMMON, backbones=Required(list), rows=Required(list), report=REPORT,
                                paper_table="", transformation=""),
}

# Fields with a fixed set of values, per stage kind (dotted path → values), checked after the merge.
CHOICES = {
    "backbone": {"loss.kind": LOSS_KINDS},
    "side_info": {"loss.kind": LOSS_KINDS, "input_norm": INPUT_NORMS, "method": SIDE_INFO_METHODS},
    "transformation": {"feature_mode": FEATURE_MODES, "method": TRANSFORMATION_METHODS,
                       "side_info.kind": SIDE_INFO_KINDS},
}


def _plain(value):
  """ConfigDicts and mappings → plain dicts (recursively); other values as they are."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return copy.deepcopy(value)


def _where(path: str, field: str) -> str:
  return f"{path}.{field}" if path else field


def _leaf(spec, value, path: str, stage: str):
  """A given value for a leaf field: an int where a float is expected becomes a float (``epochs=8``)."""
  kind = spec.kind if isinstance(spec, Required) else type(spec)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is dict and not isinstance(value, Mapping):
    raise ConfigError(f"stage {stage!r}: {path} must be a block of fields, not {value!r}")
  return value


def _merge(spec, given, path: str, stage: str):
  """``given`` over ``spec``'s defaults; refuses unknown fields (not in a :class:`Free` block) and missing ones."""
  if not isinstance(given, Mapping):
    raise ConfigError(f"stage {stage!r}: {path} must be a block of fields, not {given!r}")
  unknown = [k for k in given if k not in spec]
  if unknown and not isinstance(spec, Free):
    raise ConfigError(f"stage {stage!r}: unknown field {_where(path, unknown[0])!r}; valid: {', '.join(spec)}")
  out = {}
  for key, default in spec.items():
    where = _where(path, key)
    if key in given and isinstance(default, dict):
      out[key] = _merge(default, given[key], where, stage)
    elif key in given:
      out[key] = _leaf(default, given[key], where, stage)
    elif isinstance(default, Required):
      raise ConfigError(f"stage {stage!r}: {where} is required")
    elif isinstance(default, dict):
      out[key] = _merge(default, {}, where, stage)
    else:
      out[key] = copy.deepcopy(default)
  out.update({k: copy.deepcopy(given[k]) for k in unknown})
  return out


def _data_spec(data, stage: str) -> dict:
  """The data block's schema: that of its dataset (``data.name``)."""
  name = data.get("name") if isinstance(data, Mapping) else None
  if name not in DATA:
    raise ConfigError(f"stage {stage!r}: unknown dataset data.name={name!r}; valid: {', '.join(DATA)}")
  return {"name": Required(str), **DATA[name]}


def resolve_data(data_cfg: Any) -> ml_collections.ConfigDict:
  """A complete ``data`` block: its fields over its dataset's defaults (:data:`DATA`); idempotent."""
  given = _plain(data_cfg)
  return ml_collections.ConfigDict(_merge(_data_spec(given, "?"), given, "data", "?"))


def kind_spec(stage_cfg: Mapping) -> dict:
  """The schema of one stage config: its kind's, with the data block of its dataset."""
  stage = str(stage_cfg.get("name", "?"))
  kind = stage_cfg.get("kind")
  if kind not in KINDS:
    raise ConfigError(f"stage {stage!r}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
  spec = dict(KINDS[kind], data=_data_spec(stage_cfg.get("data"), stage))
  if kind == "side_info" and stage_cfg.get("method", spec["method"]) in CLASSIFIER_METHODS:
    spec["model"] = CLASSIFIER_MODEL  # the alternate old models are classifiers, like the backbones
  return spec


def _check_choices(cfg: dict, stage: str):
  for path, valid in CHOICES.get(cfg["kind"], {}).items():
    block, _, field = path.rpartition(".")
    holder = cfg.get(block, {}) if block else cfg
    if field in holder and holder[field] not in valid:
      raise ConfigError(f"stage {stage!r}: unknown {path} {holder[field]!r}; valid: {', '.join(valid)}")


def resolve(stage_cfg: Any) -> ml_collections.ConfigDict:
  """The complete stage config: ``stage_cfg``'s fields over its kind's defaults.

  Args:
    stage_cfg: a stage config (ConfigDict or mapping), complete or not: a saved ``config.json`` too.

  Returns:
    a new ConfigDict with every field of the kind; ``resolve(resolve(c)) == resolve(c)``.

  Raises:
    ConfigError: an unknown kind, dataset or field, a missing required field or a value outside its choices.
  """
  given = _plain(stage_cfg)
  if not isinstance(given, Mapping):
    raise ConfigError(f"a stage config is a block of fields, not {given!r}")
  stage = str(given.get("name", "?"))
  out = _merge(kind_spec(given), given, "", stage)
  _check_choices(out, stage)
  return ml_collections.ConfigDict(out)
