"""Checkpoint I/O for the task models: torch .pth files in, orbax
checkpoints out and back (`tcr-jax import-torchvision`).

    summary = import_to_checkpoint("deeplabv3_resnet50", "w.pth", "ckpt/")
    module, variables = load_checkpoint("ckpt/")

A checkpoint directory holds the {"params", "batch_stats"} pytree written
through tcr_jax.checkpoints (the orbax manager layout the training stages
use) and `tcr_jax_task.json` (arch, num_classes, aux_loss, source). The name
mapping itself lives in torchvision_import. `load_into` puts a loaded
checkpoint into a larger model's variables (the task networks inside the
base and enhancement layers). Torch (optional) and orbax (slow to import;
the heads do without it) are imported where they are used.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.errors import UserError
from tcr_jax.tasks import torchvision_import as ti

CHECKPOINT_META = "tcr_jax_task.json"


def read_state_dict(path: str) -> dict[str, Any]:
  """Reads a torch.save'd state_dict (or a torchvision reference-script
  checkpoint holding one under "model") on the CPU, weights only."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("reading .pth files needs torch: install the parity "
                    "extra (pip install -e .[parity])") from e
  if not os.path.isfile(path):
    raise UserError(f"state_dict file not found: {path}")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and weights_only errors alike
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"could not read {path} as a torch state_dict: {reason}") from e
  for wrapper in ("model", "state_dict"):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise UserError(f"{path} does not hold a state_dict (names -> tensors)")
  return dict(obj)


def _require_empty(output_dir: str) -> str:
  """The absolute path of output_dir, which must be absent or empty."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and (not os.path.isdir(output_dir)
                                     or os.listdir(output_dir)):
    raise UserError(f"output {output_dir} exists and is not an empty directory")
  return output_dir


def write_checkpoint(output_dir: str, variables: Mapping[str, Any],
                     meta: Mapping[str, Any]) -> None:
  """Writes variables (orbax) and meta (json) into output_dir, which must
  not exist or be an empty directory."""
  from tcr_jax import checkpoints  # lazy: orbax, see the docstring
  output_dir = _require_empty(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  checkpoints.save_variables(output_dir, dict(variables))
  with open(os.path.join(output_dir, CHECKPOINT_META), "w") as f:
    json.dump(dict(meta), f, indent=2)


def read_meta(output_dir: str) -> dict[str, Any]:
  """The json written next to the variables (UserError if absent)."""
  meta_path = os.path.join(os.path.abspath(output_dir), CHECKPOINT_META)
  if not os.path.isfile(meta_path):
    raise UserError(f"{os.path.abspath(output_dir)} is not a tcr-jax "
                    f"import-torchvision checkpoint (no {CHECKPOINT_META})")
  with open(meta_path) as f:
    return json.load(f)


def import_to_checkpoint(arch: str, state_dict_path: str,
                         output_dir: str) -> dict[str, Any]:
  """Converts a torchvision .pth to an orbax checkpoint in output_dir.

  Writes output_dir/variables and output_dir/tcr_jax_task.json. Returns a
  summary: arch, num_classes, aux_loss, num_params, output, reinitialised,
  dropped.
  """
  ti.arch_spec(arch)  # an unknown arch fails before any file is read
  output_dir = _require_empty(output_dir)
  state_dict = read_state_dict(state_dict_path)
  result = ti.convert_state_dict(arch, state_dict)
  meta = {"arch": arch, "num_classes": result.num_classes,
          "aux_loss": result.aux_loss, "source": os.path.abspath(state_dict_path)}
  write_checkpoint(output_dir, result.variables, meta)
  return {"arch": arch, "num_classes": result.num_classes,
          "aux_loss": result.aux_loss,
          "num_params": ti.count_params(result.variables),
          "output": output_dir, "reinitialised": result.reinitialised,
          "dropped": result.dropped}


def load_checkpoint(output_dir: str) -> tuple[nn.Module, dict[str, Any]]:
  """(module, variables) from a directory written by import_to_checkpoint."""
  output_dir = os.path.abspath(output_dir)
  meta = read_meta(output_dir)
  module = ti.build_module(meta["arch"], meta["num_classes"], meta["aux_loss"])
  from tcr_jax import checkpoints  # lazy: orbax, see the docstring
  return module, checkpoints.load_variables(output_dir,
                                            ti.abstract_variables(module))


def load_into(variables, where: tuple[str, ...], path: str, arch: str):
  """Puts the variables of a `tcr-jax import-torchvision` checkpoint of
  `arch` at `where` (e.g. ("head", "backbone")) in a model's variables;
  returns the new tree (UserError if the checkpoint holds another
  architecture or does not fit)."""
  module, loaded = load_checkpoint(path)
  if type(module) is not type(ti.build_module(arch, 1)):
    raise UserError(f"{path}: holds a {type(module).__name__}, this slot takes "
                    f"{arch} (tcr-jax import-torchvision --arch {arch})")
  out = jax.tree.map(lambda a: a, variables)  # a copy of the containers
  for col in ("params", "batch_stats"):
    node = out[col]
    for key in where[:-1]:
      node = node[key]
    want = jax.tree.map(jnp.shape, node[where[-1]])
    got = jax.tree.map(jnp.shape, loaded[col])
    if want != got:
      raise UserError(f"{path}: its {arch} variables do not fit the model "
                      "(different architecture or class count)")
    node[where[-1]] = loaded[col]
  return out
