"""Import torchvision weights into the Flax task models: the name and
layout mapping (leaf tables), conversion both ways, and the arch table.

    module, variables = load_torchvision("deeplabv3_resnet50", state_dict)
    outputs = module.apply(variables, images_nhwc, train=False)

`state_dict` maps torchvision's parameter names to numpy arrays or torch
tensors (torch itself is only imported to read .pth files). Archs:

  lraspp_mobilenet_v3_large  LRASPPMobileNetV3: {"out"}
  deeplabv3_resnet50         DeepLabV3ResNet50: {"out", "aux" if aux_loss}
  mobilenet_v3_large         an ImageNet classifier's state_dict, loaded as
                             the dilated LRASPP backbone: {"low", "high"}
  resnet50                   an ImageNet classifier's state_dict, loaded as
                             the dilated DeepLabV3 backbone: {"aux", "out"}
  fasterrcnn_resnet50_fpn_v2 FasterRCNN (91 COCO classes by default):
                             {"boxes", "scores", "labels"} in eval

The ImageNet classifiers' `classifier.*` / `fc.*` keys are dropped (logged).
With `num_classes` different from the checkpoint's, the class-dependent
head layers are initialised afresh (PRNGKey(0)): `load_torchvision` warns,
`load_torchvision_report` returns their names. A missing, unexpected or
mis-shaped key is a UserError naming each of them.
`backbone_to_segmentation_variables` puts an imported backbone into a
freshly initialised segmentation model (the paper starts from ImageNet).
Reading .pth files and writing / reading orbax checkpoints
(`tcr-jax import-torchvision`) is in checkpoint_io.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tcr_jax.errors import UserError
from tcr_jax.tasks import deeplabv3, faster_rcnn, lraspp, mobilenetv3, resnet

Leaf = tuple[tuple[str, ...], str, str]  # (flax path, torch module, kind)

# Per kind: (torch suffix, flax collection, flax name). A kernel's layout
# follows the kind: conv (O, I, kh, kw) <-> (kh, kw, I, O); dense (O, I) <->
# (I, O); dense_chw<s>, a Linear whose input torch flattens from (C, s, s)
# and Flax from (s, s, C) (the box head's fc6 after 7x7 RoIAlign).
_KIND_ENTRIES = {
    "conv": ((".weight", "params", "kernel"),),
    "conv_bias": ((".weight", "params", "kernel"), (".bias", "params", "bias")),
    "bn": ((".weight", "params", "scale"), (".bias", "params", "bias"),
           (".running_mean", "batch_stats", "mean"),
           (".running_var", "batch_stats", "var")),
    "dense": ((".weight", "params", "kernel"), (".bias", "params", "bias")),
}
_DENSE_CHW = "dense_chw"
_OPTIONAL_BN_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 8


@dataclasses.dataclass(frozen=True)
class _Arch:
  """How one torchvision architecture maps onto a Flax module."""
  build: Callable[[int, bool], nn.Module]
  leaves: Callable[[bool], list[Leaf]]
  classes_key: str | None = None      # tensor whose shape[0] is num_classes
  class_layers: tuple[str, ...] = ()  # torch modules sized by num_classes
  aux_prefix: str | None = None       # keys of the optional aux head
  dropped_prefixes: tuple[str, ...] = ()  # ImageNet classifier keys
  default_classes: int = 21


def _lraspp_leaves(aux_loss: bool) -> list[Leaf]:
  del aux_loss
  return mobilenetv3.torch_leaves("backbone.", ("backbone",)) + lraspp.torch_leaves()


def _deeplab_leaves(aux_loss: bool) -> list[Leaf]:
  return (resnet.torch_leaves("backbone.", ("backbone",))
          + deeplabv3.torch_leaves(aux_loss))


ARCHS: dict[str, _Arch] = {
    "lraspp_mobilenet_v3_large": _Arch(
        build=lambda n, aux: lraspp.LRASPPMobileNetV3(num_classes=n),
        leaves=_lraspp_leaves,
        classes_key="classifier.low_classifier.weight",
        class_layers=("classifier.low_classifier", "classifier.high_classifier")),
    "deeplabv3_resnet50": _Arch(
        build=lambda n, aux: deeplabv3.DeepLabV3ResNet50(num_classes=n, aux_loss=aux),
        leaves=_deeplab_leaves,
        classes_key="classifier.4.weight",
        class_layers=("classifier.4", "aux_classifier.4"),
        aux_prefix="aux_classifier."),
    "mobilenet_v3_large": _Arch(
        build=lambda n, aux: mobilenetv3.MobileNetV3Large(dilated=True),
        leaves=lambda aux: mobilenetv3.torch_leaves("features.", ()),
        dropped_prefixes=("classifier.",), default_classes=0),
    "resnet50": _Arch(
        build=lambda n, aux: resnet.ResNet50(),
        leaves=lambda aux: resnet.torch_leaves("", ()),
        dropped_prefixes=("fc.",), default_classes=0),
    "fasterrcnn_resnet50_fpn_v2": _Arch(
        build=lambda n, aux: faster_rcnn.FasterRCNN(num_classes=n),
        leaves=lambda aux: faster_rcnn.torch_leaves(),
        classes_key="roi_heads.box_predictor.cls_score.weight",
        class_layers=("roi_heads.box_predictor.cls_score",
                      "roi_heads.box_predictor.bbox_pred"),
        default_classes=91),
}
SEGMENTATION_ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_resnet50")
BACKBONE_OF = {"lraspp_mobilenet_v3_large": "mobilenet_v3_large",
               "deeplabv3_resnet50": "resnet50"}


@dataclasses.dataclass
class ImportResult:
  """What `convert_state_dict` built and what it left out."""
  arch: str
  module: nn.Module
  variables: dict[str, Any]
  num_classes: int
  aux_loss: bool
  reinitialised: list[str]  # torch module names initialised afresh
  dropped: list[str]        # checkpoint keys deliberately not used


def arch_spec(arch: str) -> _Arch:
  """The ARCHS entry of `arch` (UserError naming the valid ones)."""
  if arch not in ARCHS:
    raise UserError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
  return ARCHS[arch]


def build_module(arch: str, num_classes: int, aux_loss: bool = False) -> nn.Module:
  """The Flax module of `arch` (variables not included)."""
  return arch_spec(arch).build(num_classes, aux_loss)


def _listing(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  if len(items) > _MAX_LISTED:
    shown += f" ... and {len(items) - _MAX_LISTED} more"
  return shown


def _to_numpy(value: Any) -> np.ndarray | None:
  """numpy array from a numpy array or torch tensor (None if neither)."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    return np.asarray(value)
  return None


@functools.lru_cache(maxsize=None)
def abstract_variables(module: nn.Module):
  """Shapes of the module's variables (ShapeDtypeStructs, cached: do not
  mutate), without computing them."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(functools.partial(module.init, train=False),
                        jax.random.PRNGKey(0), x)


def init_variables(module: nn.Module, seed: int = 0,
                   select: Callable[[tuple[str, ...]], bool] | None = None
                   ) -> dict[str, Any]:
  """Fresh variables of a task module, from PRNGKey(seed).

  The models are fully convolutional, so the variables do not depend on the
  image size: a 64x64 input is used. `select(path)` (path = (collection,
  module, ..., name)) keeps only some variables, e.g. the heads; the others
  are then neither computed nor compiled, which matters on CPU where
  compiling the random initialisers of a whole ResNet takes many seconds.
  Selected values equal those of the full init.
  """
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)

  def init(key):
    flat = traverse_util.flatten_dict(module.init(key, x, train=False))
    if select is not None:
      flat = {k: v for k, v in flat.items() if select(k)}
    return traverse_util.unflatten_dict(flat)

  return jax.jit(init)(jax.random.PRNGKey(seed))


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters (the "params" collection only)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def _entries(kind: str) -> tuple[tuple[str, str, str], ...]:
  return _KIND_ENTRIES["dense" if kind.startswith(_DENSE_CHW) else kind]


def _torch_shape(flax_shape: tuple[int, ...], flax_name: str,
                 kind: str) -> tuple[int, ...]:
  if flax_name != "kernel":
    return tuple(flax_shape)
  if kind.startswith("conv"):  # (kh, kw, I, O) -> (O, I, kh, kw)
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  return tuple(flax_shape[::-1])  # (I, O) -> (O, I)


def _from_torch(array: np.ndarray, flax_name: str, kind: str) -> np.ndarray:
  if flax_name == "kernel":
    if kind.startswith("conv"):
      array = array.transpose(2, 3, 1, 0)
    elif kind.startswith(_DENSE_CHW):
      s = int(kind[len(_DENSE_CHW):])
      o = array.shape[0]
      array = array.reshape(o, -1, s, s).transpose(2, 3, 1, 0).reshape(-1, o)
    else:
      array = array.T
  return np.ascontiguousarray(array, dtype=np.float32)


def _to_torch(array: np.ndarray, flax_name: str, kind: str) -> np.ndarray:
  if flax_name == "kernel":
    if kind.startswith("conv"):
      array = array.transpose(3, 2, 0, 1)
    elif kind.startswith(_DENSE_CHW):
      s = int(kind[len(_DENSE_CHW):])
      o = array.shape[1]
      array = array.reshape(s, s, -1, o).transpose(3, 2, 0, 1).reshape(o, -1)
    else:
      array = array.T
  return np.ascontiguousarray(array, dtype=np.float32)


def convert_state_dict(arch: str, state_dict: Mapping[str, Any],
                       num_classes: int | None = None,
                       aux_loss: bool | None = None) -> ImportResult:
  """Builds the Flax module for `arch` and its variables from `state_dict`.

  Args:
    arch: one of ARCHS.
    state_dict: torchvision parameter names -> numpy arrays / torch tensors.
    num_classes: output classes; None takes the checkpoint's. A different
      count initialises the class-dependent layers afresh (PRNGKey(0)).
    aux_loss: deeplabv3_resnet50 only: build the aux head; None follows
      the checkpoint. True without aux weights initialises it afresh.
  Raises:
    UserError: unknown arch, or keys missing / unexpected / mis-shaped.
  """
  spec = arch_spec(arch)
  if not isinstance(state_dict, Mapping):
    raise UserError(f"expected a state_dict (a mapping of names to tensors), "
                    f"got {type(state_dict).__name__}")
  arrays, not_arrays = {}, []
  for key, value in state_dict.items():
    array = _to_numpy(value)
    if array is None:
      not_arrays.append(str(key))
    else:
      arrays[str(key)] = array
  if not_arrays:
    raise UserError(f"state_dict values that are not tensors: {_listing(not_arrays)}")

  ckpt_classes = None
  if spec.classes_key and spec.classes_key in arrays:
    ckpt_classes = int(arrays[spec.classes_key].shape[0])
  if num_classes is None:
    num_classes = ckpt_classes if ckpt_classes is not None else spec.default_classes
  ckpt_aux = bool(spec.aux_prefix) and any(
      k.startswith(spec.aux_prefix) for k in arrays)
  if spec.aux_prefix is None:
    if aux_loss:
      raise UserError(f"{arch} has no auxiliary head (aux_loss=True)")
    aux_loss = False
  elif aux_loss is None:
    aux_loss = ckpt_aux

  module = spec.build(num_classes, aux_loss)
  abstract = traverse_util.flatten_dict(abstract_variables(module))
  leaves = spec.leaves(aux_loss)

  reinit = set()
  if ckpt_classes is not None and num_classes != ckpt_classes:
    reinit.update(spec.class_layers)
  if aux_loss and not ckpt_aux:
    reinit.update(t for _, t, _ in leaves if t.startswith(spec.aux_prefix))
  reinit &= {t for _, t, _ in leaves}

  flat, used = {}, set()
  missing, misshaped = [], []
  for fpath, tname, kind in leaves:
    if kind == "bn":
      used.add(tname + _OPTIONAL_BN_SUFFIX)
    for suffix, collection, name in _entries(kind):
      key, path = tname + suffix, (collection,) + fpath + (name,)
      used.add(key)
      if path not in abstract:
        raise AssertionError(f"mapping error: {path} not in {arch}")
      if tname in reinit:
        continue
      if key not in arrays:
        missing.append(key)
        continue
      want = _torch_shape(abstract[path].shape, name, kind)
      got = tuple(arrays[key].shape)
      if got != want:
        misshaped.append(f"{key} {list(got)} (expected {list(want)})")
        continue
      flat[path] = _from_torch(arrays[key], name, kind)

  dropped, unexpected = [], []
  for key in arrays:
    if key in used:
      if any(key.startswith(t + ".") for t in reinit):
        dropped.append(key)
    elif any(key.startswith(p) for p in spec.dropped_prefixes) or (
        spec.aux_prefix and not aux_loss and key.startswith(spec.aux_prefix)):
      dropped.append(key)
    else:
      unexpected.append(key)
  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped keys: {_listing(misshaped)}")
  if problems:
    backbone = BACKBONE_OF.get(arch)
    if backbone and any(k.startswith(("features.", "layer1.")) for k in unexpected):
      problems.append(f"this looks like an ImageNet classifier: load it with "
                      f"arch {backbone} and use backbone_to_segmentation_variables")
    raise UserError(f"state_dict does not match {arch}: " + "; ".join(problems))

  if reinit:
    fresh = traverse_util.flatten_dict(
        init_variables(module, select=lambda path: path not in flat))
    flat.update(fresh)
  unfilled = set(abstract) - set(flat)
  if unfilled:  # every variable is covered by the leaf tables
    raise AssertionError(f"mapping error: {sorted(unfilled)[:3]} not loaded")
  variables = traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in flat.items()})
  if dropped:
    logging.info("%s: checkpoint keys not used: %s", arch, _listing(dropped))
  return ImportResult(arch, module, variables, num_classes, aux_loss,
                      sorted(reinit), dropped)


def load_torchvision_report(arch: str, state_dict: Mapping[str, Any],
                            num_classes: int | None = None,
                            aux_loss: bool | None = None
                            ) -> tuple[nn.Module, dict[str, Any], list[str]]:
  """Like load_torchvision, also returning the torch names of the layers
  initialised afresh (empty when everything came from the checkpoint)."""
  result = convert_state_dict(arch, state_dict, num_classes, aux_loss)
  return result.module, result.variables, result.reinitialised


def load_torchvision(arch: str, state_dict: Mapping[str, Any],
                     num_classes: int | None = None,
                     aux_loss: bool | None = None
                     ) -> tuple[nn.Module, dict[str, Any]]:
  """(module, {"params", "batch_stats"}) from a torchvision state_dict.

  Warns (UserWarning) with the layers initialised afresh when num_classes
  or aux_loss asks for head layers the checkpoint does not have.
  """
  result = convert_state_dict(arch, state_dict, num_classes, aux_loss)
  if result.reinitialised:
    warnings.warn(f"{arch}: head layers initialised afresh (not in the "
                  f"checkpoint for num_classes={result.num_classes}): "
                  f"{', '.join(result.reinitialised)}", stacklevel=2)
  return result.module, result.variables


def export_state_dict(arch: str, variables: Mapping[str, Any]
                      ) -> dict[str, np.ndarray]:
  """The inverse of load_torchvision: torchvision names -> numpy arrays,
  loadable with torchvision's `model.load_state_dict(...)` (after
  torch.from_numpy). BN's num_batches_tracked is written as 0."""
  spec = arch_spec(arch)
  flat = traverse_util.flatten_dict(dict(variables))
  aux_loss = any(path[1] == "aux_classifier" for path in flat)
  state_dict = {}
  for fpath, tname, kind in spec.leaves(aux_loss):
    for suffix, collection, name in _entries(kind):
      array = np.asarray(flat[(collection,) + fpath + (name,)], np.float32)
      state_dict[tname + suffix] = _to_torch(array, name, kind)
    if kind == "bn":
      state_dict[tname + _OPTIONAL_BN_SUFFIX] = np.array(0, np.int64)
  return state_dict


def backbone_to_segmentation_variables(
    arch: str, backbone_variables: Mapping[str, Any], num_classes: int,
    aux_loss: bool = True, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
  """A segmentation model whose backbone comes from an imported ImageNet
  backbone (load_torchvision("mobilenet_v3_large" / "resnet50", ...)) and
  whose heads are freshly initialised with PRNGKey(seed).

  Args:
    arch: "lraspp_mobilenet_v3_large" or "deeplabv3_resnet50".
    backbone_variables: the backbone's {"params", "batch_stats"}.
  """
  if arch not in SEGMENTATION_ARCHS:
    raise UserError(f"unknown segmentation arch {arch!r}; valid: "
                    f"{', '.join(SEGMENTATION_ARCHS)}")
  spec = ARCHS[arch]
  backbone_abstract = abstract_variables(ARCHS[BACKBONE_OF[arch]].build(0, False))
  want = jax.tree.map(lambda x: x.shape, backbone_abstract)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), dict(backbone_variables))
  if want != got:
    raise UserError(f"backbone variables do not match {BACKBONE_OF[arch]} "
                    f"(import them with load_torchvision({BACKBONE_OF[arch]!r}, ...))")
  module = spec.build(num_classes, aux_loss and spec.aux_prefix is not None)
  variables = init_variables(module, seed, select=lambda p: p[1] != "backbone")
  variables = {col: dict(tree) for col, tree in variables.items()}
  for col in variables:
    variables[col]["backbone"] = jax.tree.map(jnp.asarray, backbone_variables[col])
  return module, variables
