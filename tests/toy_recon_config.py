"""The toy base task (tests/toy_base.py) with a reconstruction enhancement:
its config, as a configs/*.py file of one's own would be."""
from tcr_jax import configs_lib as lib


def get_config(arg=None):
  arg = lib.variant(arg, ("", "smoke"))
  c = lib.paper_config("toy_recon", "reconstruction", arg)
  c.task.base = "toy_base"  # an importable module that defines Task
  c.train.base_select = "object_iou"
  if arg == "smoke":
    lib.smoke_sizes(c)
  return c
