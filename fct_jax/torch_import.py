"""PyTorch checkpoints read without PyTorch, and mapped to and from Flax variables by name.

FCT's premise is that the old model already exists. This module reads it (and the rest of an ml-fct run) from
PyTorch files and maps tensors to Flax variables; :mod:`fct_jax.torch_stages` uses it to fill a stage
(``--import_torch``) or export one (``--export_torch``, :func:`from_flax`: a state dict that ml-fct's modules load
strictly).

What it reads (:func:`read_state_dict`), with NumPy only — PyTorch need not be installed:

* TorchScript archives (``torch.jit.save``): ml-fct saves every model this way — backbones wrapped in its
  ``FeatureExtractor`` (parameter names ``model.conv1.weight``, ...), the transformation as
  ``MLP_BN_SIDE_PROJECTION`` — and loads its published SimCLR side-information models with ``torch.jit.load``
  too (those files could not be tried here);
* ``torch.save`` zip files (PyTorch ≥ 1.6) holding a state dict, or a dict holding one (e.g. under
  ``state_dict``);
* ``.npz`` files of ``{name: array}`` (``np.savez(f, **{k: v.numpy() for k, v in sd.items()})``).

Pickled data is read with an unpickler that builds only dicts, lists, tensors and plain attribute records; any
other class in the file is refused, so a checkpoint cannot run code.

What it maps (:func:`to_flax`): the ResNet family (ml-fct's embedding construction, or torchvision's network with
``embedding_dim=None``; ml-fct's classifier is a bias-free 1×1 conv, torchvision's a Linear with bias) and the FCT
transformation MLP. Every variable of the Flax model must be found with the right shape, and every tensor of the
checkpoint must be used (BatchNorm's ``num_batches_tracked`` aside), else a one-line error names the first that is
not; ``allow_unused`` lists extra tensors instead of refusing (e.g. a projection head beside a SimCLR encoder).

Checked against ml-fct's own code by ``benchmarks/torch_parity.py`` (needs PyTorch and an ml-fct checkout; not
run by CI): its ResNet18-128 and ResNet50-128 (random weights, randomised BatchNorm statistics, 10 classes) and
``MLP_BN_SIDE_PROJECTION(128, 128, 128, 2048)``, saved with ml-fct's ``backbone_to_torchscript`` /
``torch.jit.save`` and imported here, give its eval-mode embeddings and logits to 4.2e-7 (outputs of magnitude
0.5–2.1), and exported back give them exactly. The tests repeat this on tiny networks that PyTorch wrote
(tests/data/make_torch_fixtures.py, whose blocks load ml-fct's state dicts strictly and agree with ml-fct exactly).
"""

import collections
import pickle
import re
import zipfile
from typing import Any, Dict, Optional, Tuple

import jax
import ml_dtypes
import numpy as np
from etils import epath

from fct_jax.errors import FCTError

# torch storage class → numpy dtype of its bytes.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Record:
  """An object of a TorchScript class (a module): only its attributes are kept."""

  def __init__(self, *_):
    pass

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.__dict__.update(state)


def _rebuild_tensor(storage, offset, size, stride, *_):
  size, stride, offset = tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset)
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise pickle.UnpicklingError(f"a tensor with shape {size}, strides {stride} and offset {offset}")
  if not all(size):
    return np.zeros(size, storage.dtype)
  # as_strided does not check bounds: a tensor reaching outside its storage would read other memory.
  if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise pickle.UnpicklingError(f"a tensor of shape {size} reaches outside its storage of {storage.size} values")
  return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * storage.dtype.itemsize for s in stride)).copy()


def _rebuild_parameter(data, *_):
  return data


class _Unpickler(pickle.Unpickler):
  """Builds a torch pickle's dicts, lists and tensors (as numpy arrays); refuses every other class."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str):
    super().__init__(file)
    self._archive, self._root, self._byteorder = archive, root, byteorder

  def find_class(self, module, name):
    if module == "__torch__" or module.startswith("__torch__."):  # TorchScript module classes (any module)
      return type(name, (_Record,), {})
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
      return list
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    raise pickle.UnpicklingError(f"unsupported object {module}.{name} (fct_jax reads tensors, dicts and "
                                 "TorchScript modules only: save the model's state_dict(), or script it)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent object {pid!r:.60}")
    dtype, key = np.dtype(pid[1]), str(pid[2])
    data = np.frombuffer(self._archive.read(f"{self._root}/data/{key}"), dtype=dtype)
    return data.byteswap() if self._byteorder == "big" else data


def _flatten(obj, prefix: str, out: Dict[str, np.ndarray]):
  """Tensors of nested dicts and TorchScript records as ``{"a.b.weight": array}`` (other values dropped)."""
  if isinstance(obj, np.ndarray):
    out[prefix[:-1]] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f"{prefix}{k}.", out)
  elif isinstance(obj, _Record):
    for k, v in vars(obj).items():
      _flatten(v, f"{prefix}{k}.", out)
  return out


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """``{name: array}`` of a PyTorch checkpoint (TorchScript, ``torch.save`` zip, or ``.npz``), in PyTorch layout.

  Args:
    path: a local path or any path ``etils.epath`` opens (``gs://...``).

  Raises:
    FCTError: the file is missing, not one of these formats, or holds no tensors.
  """
  if not epath.Path(path).is_file():
    raise FCTError(f"checkpoint {path} not found")
  try:
    with epath.Path(path).open("rb") as f:
      if str(path).endswith(".npz"):
        with np.load(f, allow_pickle=False) as z:
          out = {k: np.asarray(z[k]) for k in z.files}
      else:
        out = _read_torch_zip(f)
  except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
    raise FCTError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                   ) from e
  if not out:
    raise FCTError(f"checkpoint {path} holds no tensors")
  return out


def _read_torch_zip(file) -> Dict[str, np.ndarray]:
  if not zipfile.is_zipfile(file):
    raise ValueError("not a zip archive: save it with PyTorch >= 1.6 (torch.save or torch.jit.save), or as .npz")
  with zipfile.ZipFile(file) as archive:
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError("no data.pkl in the archive: not a PyTorch checkpoint")
    root = pickles[0].split("/")[0]
    names = set(archive.namelist())
    byteorder = archive.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in names else "little"
    with archive.open(pickles[0]) as f:
      obj = _Unpickler(f, archive, root, byteorder).load()
  return _flatten(obj, "", {})


# ------------------------------------------------------------------------------------------------ name mapping

# Flax module name → PyTorch module path, per model family. ResNet: ml-fct's and torchvision's names agree
# (``layer1.0.downsample.0``); the classifier is ``fc`` in both.
_RESNET_MODULES = [(r"layer(\d+)_(\d+)", r"layer\1.\2"), (r"downsample_conv", "downsample.0"),
                   (r"downsample_bn", "downsample.1"), (r"classifier", "fc")]
# ml-fct's MLP_BN_SIDE_PROJECTION: p1/p2/mixer are Sequentials of ConvBlock(conv, normalizer).
_FCT_MLP_MODULES = [(r"old_proj(\d)_dense", r"p1.\1.conv"), (r"old_proj(\d)_bn", r"p1.\1.normalizer"),
                    (r"side_proj(\d)_dense", r"p2.\1.conv"), (r"side_proj(\d)_bn", r"p2.\1.normalizer"),
                    (r"mix(\d)_dense", r"mixer.\1.conv"), (r"mix(\d)_bn", r"mixer.\1.normalizer"),
                    (r"mix_out", "mixer.2.conv")]
# The second element names a tensor every model of the family has once, to find the model's prefix by.
FAMILIES = {"resnet": (_RESNET_MODULES, "layer1.0.conv1.weight"), "fct_mlp": (_FCT_MLP_MODULES, "mixer.0.conv.weight")}
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
# Tensors a Flax model has no variable for, by design.
_SKIPPED = ("num_batches_tracked",)


def _keys(path) -> Tuple[str, ...]:
  """A pytree key path (dict keys) as the tuple of names ``(collection, module, ..., leaf)``."""
  return tuple(getattr(k, "key", str(k)) for k in path)


def torch_name(family: str, path: Tuple[str, ...]) -> str:
  """The PyTorch name (no prefix) of the Flax variable at ``path`` = (collection, module, ..., leaf)."""
  rules = FAMILIES[family][0]
  col, *mods, leaf = path
  if (col, leaf) not in _LEAVES:
    raise FCTError(f"no PyTorch counterpart for the Flax variable {'/'.join(path)}")
  parts = []
  for m in mods:
    for pattern, repl in rules:
      if re.fullmatch(pattern, m):
        m = re.sub(pattern, repl, m)
        break
    parts.append(m)
  return ".".join(parts + [_LEAVES[(col, leaf)]])


def _to_flax_layout(x: np.ndarray, want: Tuple[int, ...]) -> Optional[np.ndarray]:
  """PyTorch layout → Flax layout for a variable of shape ``want``; None when the shapes cannot agree."""
  x = np.asarray(x, np.float32)
  if len(want) == 4 and x.ndim == 4:  # conv: OIHW → HWIO
    x = x.transpose(2, 3, 1, 0)
  elif len(want) == 2 and (x.ndim == 2 or (x.ndim == 4 and x.shape[2:] == (1, 1))):  # Linear / 1×1 conv [out, in]
    x = x.reshape(x.shape[:2]).T
  return x if x.shape == tuple(want) else None


def find_prefix(state: Dict[str, np.ndarray], family: str, prefix: Optional[str] = None) -> str:
  """The name prefix of the model in ``state`` (``""``, ``"model."`` for ml-fct's backbones, ...).

  Raises:
    FCTError: no model of ``family`` in ``state``, or several (e.g. ml-fct's ``TransformedOldModel`` holds two
      ResNets): then ``prefix`` must say which.
  """
  anchor = FAMILIES[family][1]
  if prefix is not None:
    prefix = prefix if not prefix or prefix.endswith(".") else prefix + "."
    if prefix + anchor not in state:
      raise FCTError(f"no {prefix}{anchor} in the checkpoint; prefixes with a {family} model: "
                     f"{', '.join(repr(p) for p in _find_prefixes(state, anchor)) or 'none'}")
    return prefix
  found = _find_prefixes(state, anchor)
  if not found:
    raise FCTError(f"the checkpoint holds no {family} model (no tensor named *{anchor}); its first tensors: "
                   f"{', '.join(list(state)[:3])}")
  if len(found) > 1:
    raise FCTError(f"the checkpoint holds {len(found)} {family} models (prefixes "
                   f"{', '.join(repr(p) for p in found)}); choose one with --import_prefix")
  return found[0]


def _find_prefixes(state, anchor: str):
  """The prefixes under which ``state`` has a tensor named ``anchor`` (whole dot-separated parts only)."""
  return sorted(k[:-len(anchor)] for k in state if k.endswith(anchor) and (k == anchor or
                                                                           k[-len(anchor) - 1] == "."))


def to_flax(state: Dict[str, np.ndarray], template: Any, family: str, *, prefix: Optional[str] = None,
            allow_unused: bool = False) -> Tuple[Any, list]:
  """Fills a Flax variable tree from a PyTorch state dict.

  Args:
    state: ``{name: array}`` in PyTorch layout (:func:`read_state_dict`).
    template: the Flax variables (arrays or ``jax.ShapeDtypeStruct``; ``jax.eval_shape`` of ``init``).
    family: ``"resnet"`` or ``"fct_mlp"`` (:data:`FAMILIES`).
    prefix: the model's name prefix in ``state`` (found when None; see :func:`find_prefix`).
    allow_unused: tolerate tensors under the prefix that the Flax model has no variable for.

  Returns:
    ``(variables, unused)``: the tree of float32 numpy arrays in Flax layout and the names of tensors left
    unused (empty unless ``allow_unused``).

  Raises:
    FCTError: a variable is missing or of another shape, or (without ``allow_unused``) a tensor is unused.
  """
  if family not in FAMILIES:
    raise FCTError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
  prefix = find_prefix(state, family, prefix)
  used = set()

  def fill(path, leaf):
    keys = _keys(path)
    name = prefix + torch_name(family, keys)
    if name not in state:
      raise FCTError(f"the checkpoint has no {name} (for the Flax variable {'/'.join(keys)}); is it a "
                     f"{family} model of this configuration?")
    x = _to_flax_layout(state[name], tuple(leaf.shape))
    if x is None:
      raise FCTError(f"{name} has shape {tuple(np.shape(state[name]))}, but the configured model's "
                     f"{'/'.join(keys)} needs {tuple(leaf.shape)} (in Flax layout); does the stage config "
                     "describe this checkpoint's model (architecture, widths, classes)?")
    used.add(name)
    return x

  variables = jax.tree_util.tree_map_with_path(fill, template)
  unused = [k for k in state if k.startswith(prefix) and k not in used and k.rsplit(".", 1)[-1] not in _SKIPPED]
  if unused and not allow_unused:
    raise FCTError(f"{len(unused)} tensor(s) of the checkpoint have no place in the configured model, e.g. "
                   f"{unused[0]} {tuple(np.shape(state[unused[0]]))}; check the stage config, or pass "
                   "--import_allow_unused to ignore them")
  return variables, unused


def from_flax(variables: Any, family: str, *, linear_as_conv: bool = True) -> Dict[str, np.ndarray]:
  """A PyTorch state dict of Flax variables (the inverse of :func:`to_flax`).

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a ResNet or an FCT MLP.
    family: ``"resnet"`` or ``"fct_mlp"``.
    linear_as_conv: Dense kernels as ml-fct's 1×1 convs ``[out, in, 1, 1]`` (its classifier and MLP layers);
      False: as ``nn.Linear`` weights ``[out, in]`` (torchvision's ``fc``).

  Returns:
    ``{name: array}`` in PyTorch layout, float32, with BatchNorm's ``num_batches_tracked`` (0), so that
    ``model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})`` loads it strictly.
  """
  if family not in FAMILIES:
    raise FCTError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    keys = _keys(path)
    x = np.asarray(leaf, np.float32)
    if x.ndim == 4:  # conv: HWIO → OIHW
      x = x.transpose(3, 2, 0, 1)
    elif x.ndim == 2:  # Dense: [in, out] → [out, in] (+ 1×1)
      x = x.T.reshape(x.shape[::-1] + ((1, 1) if linear_as_conv else ()))
    name = torch_name(family, keys)
    out[name] = x
    if name.endswith(".running_mean"):
      out[name[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return out
