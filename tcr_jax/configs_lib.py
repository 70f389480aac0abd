"""Shared pieces of the experiment configs (configs/*.py).

A config file calls `experiment_config(name, enhancement_task, arg)`; `arg`
picks a variant, big_vision style:

  ""          the paper's settings on Cityscapes (config.data.name)
  "synthetic" the embedded synthetic scenes, sized for a laptop CPU
  "smoke"     tiny everything, for tests (a few seconds per stage)

Every hyper-parameter of the paper's model (docs/design.md) is a field here.
"""
from __future__ import annotations

import ml_collections

VARIANTS = ("", "synthetic", "smoke")


def experiment_config(experiment: str, enhancement_task: str,
                      arg: str | None = None) -> ml_collections.ConfigDict:
  arg = (arg or "").strip()
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; expected one of "
                     f"{', '.join(repr(v) for v in VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.experiment = experiment
  c.variant = arg or "paper"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "cityscapes"
  c.data.data_dir = ""
  c.data.height = 1024
  c.data.width = 2048
  c.data.eval_images = 500  # Cityscapes validation
  c.data.hflip = True
  c.data.color_jitter = 0.5  # brightness, contrast, saturation

  # Base layer: depth (LRASPP MobileNetV3-L) from a half-resolution codec.
  c.model = ml_collections.ConfigDict()
  c.model.latent_channels = 192
  c.model.widths = (24, 48, 192)
  c.model.analysis_blocks = 3
  c.model.task_blocks = 1      # g_s blocks in front of a task model
  c.model.recon_blocks = 3     # g_s blocks for reconstruction
  c.model.hyper_channels = 128
  c.model.quantizer = "ste"    # or "noise"
  c.model.compute_dtype = "float32"  # or "bfloat16" for the transforms
  c.entropy_model = "hyperprior"     # hyperprior | context | checkerboard
  c.enhancement_context = "serial"   # serial (authors) | none | checkerboard

  c.task = ml_collections.ConfigDict()
  c.task.enhancement = enhancement_task  # reconstruction | segmentation
  c.task.num_classes = 20    # 19 Cityscapes train ids + 1 ignore class
  c.task.ignore_index = 19
  # Segmentation loss: num_classes * (CE(out) + aux_weight * CE(aux)).
  c.task.aux_weight = 0.5
  # The depth head predicts disparity / disparity_scale: 128 px at 2048 px
  # width (the authors'), scaled with the width for smaller images.
  c.task.disparity_scale = 128.0

  # The sweep: every alpha x method gives a base model (baseline: beta 0,
  # proposal: beta), a conditional enhancement on it, and per alpha one
  # standalone enhancement (side information zeroed).
  c.sweep = ml_collections.ConfigDict()
  c.sweep.alphas = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  c.sweep.methods = ("baseline", "proposal")
  c.sweep.beta = 0.01
  c.sweep.standalone = True
  # L_e = alpha_e * (bpp_b + bpp_e) + D_e with alpha_e = alpha * this scale.
  c.sweep.enhancement_alpha_scale = 10.0 if enhancement_task == "reconstruction" else 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 10
  c.train.learning_rate = 1e-4
  c.train.base_steps = 100_000
  c.train.enhancement_steps = 100_000
  c.train.base_grad_clip = 0.0          # 0: none (the authors')
  c.train.enhancement_grad_clip = 1.0
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.eval_every = 5000
  c.train.eval_images_during_training = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 10
  c.eval.previews = 4
  # Validation images also compressed to real files (bpp_actual_* records).
  c.eval.actual_bits_images = 500

  # Optional starting points: orbax checkpoints written by
  # `tcr-jax import-torchvision` (ImageNet backbones or task weights).
  c.init = ml_collections.ConfigDict()
  c.init.depth_head = ""
  c.init.segmentation_head = ""

  if arg == "synthetic":
    # Sized for `make demo`: the whole sweep (3 alphas x 5 models) in about
    # ten minutes on two CPU cores. The alphas are larger than the paper's
    # because the disparities and images are small.
    c.data.name = "synthetic"
    c.data.height, c.data.width = 96, 192
    c.task.disparity_scale = 12.0
    c.data.eval_images = 32
    c.model.latent_channels = 64
    c.model.widths = (16, 32, 64)
    c.model.analysis_blocks = 1
    c.model.recon_blocks = 1
    c.model.hyper_channels = 32
    c.sweep.alphas = (0.25, 1.0, 4.0)
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.base_steps = 100
    c.train.enhancement_steps = 80
    c.train.log_every = 20
    c.train.checkpoint_every = 50
    c.train.eval_every = 50
    c.train.eval_images_during_training = 16
    c.eval.batch_size = 16
    c.eval.actual_bits_images = 8
  elif arg == "smoke":
    c.data.name = "synthetic"
    # 64x128: at 32x64 the depth head's stride-16 features are 1x1 and its
    # batch-norm gradients become float noise (measured: 10% apart between
    # 1 and 4 devices), so tests of training would test nothing.
    c.data.height, c.data.width = 64, 128
    c.task.disparity_scale = 4.0
    c.data.eval_images = 4
    c.model.latent_channels = 8
    c.model.widths = (4, 6, 8)
    c.model.analysis_blocks = 1
    c.model.recon_blocks = 1
    c.model.hyper_channels = 4
    c.sweep.alphas = (0.01, 0.1)
    c.train.batch_size = 4
    c.train.learning_rate = 1e-3
    c.train.base_steps = 6
    c.train.enhancement_steps = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.eval_every = 2
    c.train.eval_images_during_training = 4
    c.eval.batch_size = 4
    c.eval.previews = 2
    c.eval.actual_bits_images = 2
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' the way --config does."""
  import importlib.util
  import os
  from tcr_jax.errors import UserError
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location("_tcr_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except ValueError as e:
    raise UserError(str(e)) from None
