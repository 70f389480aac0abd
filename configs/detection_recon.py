"""Detection (Faster R-CNN R50-FPN v2) base layer, reconstruction enhancement.

  python -m tcr_jax.main --config=configs/detection_recon.py            # COCO 2017
  python -m tcr_jax.main --config=configs/detection_recon.py:synthetic  # laptop
"""
from tcr_jax import configs_detection


def get_config(arg=None):
  return configs_detection.detection_config(arg)
