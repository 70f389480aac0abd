"""The base tasks: what each machine task of the base layer brings.

config.task.base names one: "depth" (tcr_jax/bases/depth.py, LRASPP
MobileNetV3) or "detection" (tcr_jax/bases/detection.py, Faster R-CNN), or
the import path of a module of one's own that defines `Task` (a subclass
of bases.base.BaseTask; tests/toy_base.py is one). `for_config` is the one
place that maps the name to its object; training, evaluation, the sweep,
the coder and the benchmark ask that object and never compare names.
"""
from __future__ import annotations

import importlib

from tcr_jax.bases import depth
from tcr_jax.bases.base import BaseTask
from tcr_jax.errors import UserError

# The built-in names and their modules (imported when a config names them).
BUILT_IN = {"depth": "tcr_jax.bases.depth",
            "detection": "tcr_jax.bases.detection"}


def name(config) -> str:
  """config.task.base (default "depth": workdirs from before the field)."""
  return config.task.get("base", "depth")


def for_config(config) -> BaseTask:
  """The task object of config.task.base."""
  base = name(config)
  module_name = BUILT_IN.get(base, base)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    # The module itself (or its package) is missing, not one it imports.
    if base in BUILT_IN or not (e.name == module_name
                                or module_name.startswith(f"{e.name}.")):
      raise
    raise UserError(f"config.task.base={base!r}; expected one of "
                    f"{', '.join(map(repr, BUILT_IN))} or an importable module "
                    "that defines Task") from None
  task = getattr(module, "Task", None)
  if not (isinstance(task, type) and issubclass(task, BaseTask)):
    raise UserError(f"config.task.base={base!r}: module {module_name} has no "
                    "Task class (a subclass of tcr_jax.bases.BaseTask)")
  return task(config)


def is_depth(config) -> bool:
  """Whether the config's base task is the depth one (or built on it): what
  the tools that need the depth head (the ceiling, the probes, bases_from)
  ask."""
  return isinstance(for_config(config), depth.Task)
