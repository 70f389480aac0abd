"""Depth (LRASPP MobileNetV3-L) base layer, reconstruction enhancement.

  python -m tcr_jax.main --config=configs/depth_recon.py            # Cityscapes
  python -m tcr_jax.main --config=configs/depth_recon.py:synthetic  # laptop
  python -m tcr_jax.main --config=configs/depth_recon.py:reproduction  # the paper's figures
"""
from tcr_jax import configs_lib


def get_config(arg=None):
  return configs_lib.experiment_config("depth_recon", "reconstruction", arg)
