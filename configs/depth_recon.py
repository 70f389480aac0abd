"""Depth (LRASPP MobileNetV3-L) base layer, reconstruction enhancement.

  python -m tcr_jax.main --config=configs/depth_recon.py               # Cityscapes
  python -m tcr_jax.main --config=configs/depth_recon.py:authors       # the authors' protocol
  python -m tcr_jax.main --config=configs/depth_recon.py:reproduction  # the paper's figures
  python -m tcr_jax.main --config=configs/depth_recon.py:synthetic     # laptop (make demo)
  python -m tcr_jax.main --config=configs/depth_recon.py:smoke         # a one-minute check
"""
from tcr_jax import configs_lib as lib


def get_config(arg=None):
  arg = lib.variant(arg)
  c = lib.paper_config("depth_recon", "reconstruction", arg)
  lib.depth_task(c)

  if arg == "authors":
    lib.authors_protocol(c)
    c.task.enhancement_rate_pixels = "half"  # R per half-resolution pixel
    c.train.enhancement_select = "bpp_enhancement"
    c.train.enhancement_patience = 5

  if arg in ("synthetic", "reproduction"):
    lib.synthetic_scenes(c)  # alpha_e = 30 alpha
  if arg == "synthetic":
    # `make demo`: the reproduction's small version, in at most fifteen
    # minutes with its set-up on two CPU cores (README: what it shows):
    # shorter caps, 128 test scenes; one start per method, then each alpha
    # fine-tunes the alpha before it at 0.3 times the learning rate.
    c.data.eval_images = 128
    lib.warm_starts(c, pretrain_steps=1250)
    c.train.base_steps = 250
    c.train.enhancement_steps = 500
  if arg == "reproduction":
    # make reproduction: caps that bind late (bd_rate.md's training
    # table), 256 test scenes.
    c.data.eval_images = 256
    lib.warm_starts(c, pretrain_steps=2500)
    c.train.base_steps = 750
    c.train.enhancement_steps = 1500

  if arg == "smoke":
    lib.smoke_sizes(c)
    c.task.disparity_scale = 4.0
  return c
