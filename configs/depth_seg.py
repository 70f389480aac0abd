"""Depth (LRASPP MobileNetV3-L) base layer, segmentation (DeepLabV3-R50) enhancement.

  python -m tcr_jax.main --config=configs/depth_seg.py            # Cityscapes
  python -m tcr_jax.main --config=configs/depth_seg.py:synthetic  # laptop
  python -m tcr_jax.main --config=configs/depth_seg.py:reproduction  # the paper's figures
"""
from tcr_jax import configs_lib


def get_config(arg=None):
  return configs_lib.experiment_config("depth_seg", "segmentation", arg)
