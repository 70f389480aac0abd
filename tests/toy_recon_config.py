"""The toy base task (tests/toy_base.py) with a reconstruction enhancement:
its config, as a configs/*.py file of one's own would be."""
from tcr_jax import configs_lib


def get_config(arg=None):
  c = configs_lib.experiment_config("toy_recon", "reconstruction", arg)
  c.task.base = "toy_base"  # an importable module that defines Task
  c.train.base_select = "object_iou"
  return c
