"""Depth (LRASPP MobileNetV3-L) base layer, segmentation (DeepLabV3-R50) enhancement.

  python -m tcr_jax.main --config=configs/depth_seg.py               # Cityscapes
  python -m tcr_jax.main --config=configs/depth_seg.py:authors       # the authors' protocol
  python -m tcr_jax.main --config=configs/depth_seg.py:reproduction  # the paper's figures
  python -m tcr_jax.main --config=configs/depth_seg.py:synthetic     # laptop
  python -m tcr_jax.main --config=configs/depth_seg.py:smoke         # a one-minute check

With --config.sweep.bases_from=WORKDIR it reuses the base models of a
depth_recon sweep with the same base fields (make reproduction does).
"""
from tcr_jax import configs_lib as lib


def get_config(arg=None):
  arg = lib.variant(arg)
  c = lib.paper_config("depth_seg", "segmentation", arg)
  lib.depth_task(c)

  if arg == "authors":
    lib.authors_protocol(c)
    c.train.enhancement_select = "miou"
    c.train.enhancement_patience = 50

  if arg in ("synthetic", "reproduction"):
    lib.synthetic_scenes(c)  # alpha_e = 3 alpha
    # DeepLabV3-ResNet-50 at an eighth of its widths (about 1/64 of its
    # work): at full width a segmentation step takes seconds on 2 CPU
    # cores, at a quarter 0.3 s.
    c.task.segmentation_width = 0.125
  if arg == "synthetic":
    # `make demo`'s sizes (configs/depth_recon.py).
    c.data.eval_images = 128
    lib.warm_starts(c, pretrain_steps=1250)
    c.train.base_steps = 250
    c.train.enhancement_steps = 500
  if arg == "reproduction":
    # The same base models as depth_recon's :reproduction (bases_from).
    c.data.eval_images = 256
    lib.warm_starts(c, pretrain_steps=2500)
    c.train.base_steps = 750
    c.train.enhancement_steps = 1000

  if arg == "smoke":
    lib.smoke_sizes(c)
    c.task.disparity_scale = 4.0
  return c
