"""Shared pieces of the experiment configs (configs/*.py), big_vision style.

Each configs/*.py is `get_config(arg)`: the paper's settings for its
experiment, then its variants, spelled out in that file. `arg` picks one:

  ""          the paper's settings (Cityscapes or COCO 2017)
  "authors"   the protocol of the authors' code (docs/authors.md)
  "reproduction"  the embedded synthetic scenes in the paper's regime
              (docs/reproduction.md; the depth experiments)
  "synthetic" `make demo`: sized for a laptop CPU
  "smoke"     tiny everything: a one-minute check (the tests use it)

The helpers here hold what several configs share:

  variant(arg, allowed)  the variant's name, checked
  paper_config(...)      the fields every experiment has, at the paper's values
  depth_task(c)          the depth base task's fields (configs/depth_*.py)
  authors_protocol(c)    the authors' code where it differs from the paper
                         (both depth experiments)
  synthetic_scenes(c)    the depth experiments on the embedded scenes, in
                         the paper's regime
  warm_starts(c, ...)    the demo's warm starts (the synthetic variants only)
  smoke_sizes(c)         the tiny model and steps of every :smoke
  validate(c), load_config(spec)

Every hyper-parameter of the paper's model (docs/design.md) is a field of
paper_config or of a base task's helper.
"""
from __future__ import annotations

import ml_collections

from tcr_jax.errors import UserError

VARIANTS = ("", "authors", "synthetic", "reproduction", "smoke")


def variant(arg: str | None, allowed: tuple[str, ...] = VARIANTS) -> str:
  """The variant named by a config file's argument ("" for the paper's)."""
  arg = (arg or "").strip()
  if arg not in allowed:
    raise ValueError(f"unknown config variant {arg!r}; expected one of "
                     f"{', '.join(repr(v) for v in allowed)}")
  return arg


def paper_config(experiment: str, enhancement_task: str, arg: str
                 ) -> ml_collections.ConfigDict:
  """The fields every experiment has, at the paper's values; a config file
  adds its base task's (config.task.base and the task's own fields)."""
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

  # The codec of both layers (tcr_jax/codec): ELIC transforms, a
  # half-resolution input for the depth base.
  c.model = ml_collections.ConfigDict()
  c.model.latent_channels = 192
  c.model.widths = (24, 48, 192)
  c.model.analysis_blocks = 3
  c.model.task_blocks = 1      # g_s blocks in front of a task model
  c.model.recon_blocks = 3     # g_s blocks for reconstruction
  c.model.hyper_channels = 128
  c.model.quantizer = "ste"    # or "noise"
  c.model.compute_dtype = "float32"  # or "bfloat16" for the transforms
  # The likelihood's lower bound 1e-9: "clamp" (zero gradient below it) or
  # "lower_bound" (CompressAI's LowerBound, the authors').
  c.model.likelihood_bound = "clamp"
  c.entropy_model = "hyperprior"     # hyperprior | context | checkerboard
  c.enhancement_context = "serial"   # serial (authors) | none | checkerboard

  c.task = ml_collections.ConfigDict()
  # The base task: a name of tcr_jax/bases ("depth", "detection") or the
  # import path of a module that defines Task; the config file sets it.
  c.task.base = ""
  c.task.enhancement = enhancement_task  # reconstruction | segmentation
  c.task.num_classes = 20    # 19 Cityscapes train ids + 1 ignore class
  c.task.ignore_index = 19
  # Segmentation loss: num_classes * (CE(out) + aux_weight * CE(aux)).
  c.task.aux_weight = 0.5
  # The segmentation head's width multiplier: 1 is DeepLabV3-ResNet-50 (the
  # paper's; torchvision's weights load only into it); less for CPU runs.
  c.task.segmentation_width = 1.0
  # Pixels the enhancement's rates (R_b and R_e in L_e and in its records)
  # are divided by: "full" (the input's) or "half" (the half-resolution
  # image the reconstruction enhancement codes, as the authors do).
  c.task.enhancement_rate_pixels = "full"

  # The sweep: every alpha x method gives a base model (baseline: beta 0,
  # proposal: beta), a conditional enhancement on it, and per alpha one
  # standalone enhancement (side information zeroed).
  c.sweep = ml_collections.ConfigDict()
  c.sweep.alphas = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  c.sweep.methods = ("baseline", "proposal")
  c.sweep.beta = 0.01
  c.sweep.standalone = True
  # "scratch": the standalone enhancement is trained from scratch with its
  # side information zeroed and its rate is its own; "refit" (the authors'):
  # it starts from the conditional enhancement of the same alpha (the last
  # method's), its transforms stay frozen, only the entropy model refits,
  # and its rate includes the base's.
  c.sweep.standalone_mode = "scratch"
  # A workdir of another depth sweep whose base models this one reuses (its
  # finished base stages are copied; every config field that shapes them
  # must be equal, sweep.BASE_FIELDS): depth_seg after depth_recon.
  c.sweep.bases_from = ""
  # L_e = alpha_e * (bpp_b + bpp_e) + D_e with alpha_e = alpha * this scale.
  c.sweep.enhancement_alpha_scale = 10.0 if enhancement_task == "reconstruction" else 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 10
  c.train.learning_rate = 1e-4
  c.train.base_steps = 100_000
  c.train.enhancement_steps = 100_000
  c.train.lr_schedule = "constant"      # or "cosine" (decay to 0 per stage)
  c.train.warmup_steps = 0              # linear warm-up at each stage's start
  c.train.base_grad_clip = 0.0          # 0: none (the authors')
  c.train.enhancement_grad_clip = 1.0
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.eval_every = 5000
  c.train.eval_images_during_training = 50
  # The validation metric that picks a stage's result among its evaluated
  # checkpoints, and early stopping: stop after `patience` evaluations
  # without improvement (0: train all the steps).
  c.train.base_select = "loss"
  c.train.enhancement_select = "loss"  # or bpp_enhancement, psnr, miou
  c.train.base_patience = 0
  c.train.enhancement_patience = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 10
  c.eval.previews = 4
  # Validation images also compressed to real files (bpp_actual_* records).
  c.eval.actual_bits_images = 500
  # The split every stage's figures in results.json (and the previews, the
  # references and the ceiling) are measured on: "validation", or "test"
  # (the synthetic scenes': no choice of a config or a stopping step saw
  # them). Early stopping and the choice of a stage's result use validation.
  c.eval.split = "validation"

  # Optional starting points: orbax checkpoints written by
  # `tcr-jax import-torchvision` (ImageNet backbones, the authors' start, or
  # whole task heads); the base task adds its own.
  c.init = ml_collections.ConfigDict()
  c.init.segmentation_backbone = ""
  c.init.segmentation_head = ""
  return c


def depth_task(c: ml_collections.ConfigDict) -> None:
  """The depth base task (tcr_jax/bases/depth.py): LRASPP MobileNetV3-L
  on g_s's output predicts disparity."""
  c.task.base = "depth"
  # The depth head predicts disparity / disparity_scale: 128 px at 2048 px
  # width (the authors'), scaled with the width for smaller images.
  c.task.disparity_scale = 128.0
  # Batch-norm momentum of the depth head's MobileNetV3 backbone (torch
  # convention: the weight of each new batch; torchvision's 0.01).
  c.task.depth_bn_momentum = 0.01
  c.init.depth_backbone = ""   # mobilenet_v3_large
  c.init.depth_head = ""       # lraspp_mobilenet_v3_large


def authors_protocol(c: ml_collections.ConfigDict) -> None:
  """The authors' code (adeandrade/research, compatible-representations)
  where the two depth experiments share it; each config adds its
  enhancement's choices."""
  epoch = -(-2975 // c.train.batch_size)  # Cityscapes train, batch 10
  c.entropy_model = "context"
  c.model.likelihood_bound = "lower_bound"
  c.sweep.beta = 0.1
  c.sweep.standalone_mode = "refit"
  c.task.aux_weight = 1.0
  c.train.base_steps = 1000 * epoch
  c.train.enhancement_steps = 1000 * epoch
  c.train.eval_every = epoch
  c.train.checkpoint_every = epoch
  c.train.eval_images_during_training = 500
  c.train.base_select = "loss"
  c.train.base_patience = 200


def synthetic_scenes(c: ml_collections.ConfigDict) -> None:
  """The depth experiments on the embedded synthetic scenes, in the paper's
  regime (docs/reproduction.md gives the measurements behind each choice).
  What this does that the paper does not: small images and transforms (one
  width: g_a strides 4, so the 64x128 images keep an 8x16x32 latent) and a
  batch-norm momentum of 0.1 for the depth head's short training.
    - beta 0.005: the reward beta * 255 * RMSE(x, x_rec) at most a third of
      the depth term (at 0.01 it was half of it on these scenes);
    - alphas a factor 8 apart, so that the two methods' base rates overlap;
    - a constant learning rate (a cosine to zero at a step cap would decide
      when training ends, not the validation loss), early stopping (3
      evaluations 250 steps apart without a better validation loss, or the
      cap); bd_rate.md says what ended each stage;
    - figures on the test scenes; every choice on 128 validation scenes,
      next to the trivial references (reporting/references.py)."""
  c.data.name = "synthetic"
  c.data.height, c.data.width = 64, 128
  c.task.disparity_scale = 8.0
  c.task.depth_bn_momentum = 0.1
  c.model.latent_channels = 32
  c.model.widths = (32,)
  c.model.analysis_blocks = 1
  c.model.recon_blocks = 1
  c.model.hyper_channels = 32
  c.sweep.alphas = (0.02, 0.16, 1.28)
  c.sweep.enhancement_alpha_scale *= 3.0  # 30 for the reconstruction
  c.sweep.beta = 0.005
  c.train.batch_size = 8
  c.train.learning_rate = 1e-3
  c.train.lr_schedule = "constant"
  c.train.log_every = 100
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.base_patience = 3
  c.train.enhancement_patience = 2
  c.train.eval_images_during_training = 128
  c.eval.batch_size = 32
  c.eval.actual_bits_images = 8
  c.eval.split = "test"
  # Training images the trivial references are computed on (the report sets
  # them next to the models' figures).
  c.eval.reference_train_images = 1000


def warm_starts(c: ml_collections.ConfigDict, pretrain_steps: int,
                lr_scale: float = 0.3, chain: bool = True) -> None:
  """The demo's warm starts (training/sweep.py): each method first trains
  one start for `pretrain_steps` at the first alpha, and its base models
  fine-tune it at lr_scale times the learning rate; with `chain`, each
  alpha's model fine-tunes the alpha before it instead (down the rate)."""
  c.train.base_pretrain_steps = pretrain_steps
  c.train.finetune_lr_scale = lr_scale
  c.train.finetune_chain = chain


def smoke_sizes(c: ml_collections.ConfigDict) -> None:
  """The tiny model, images and steps of every :smoke variant. 64x128: at
  32x64 the depth head's stride-16 features are 1x1 and its batch-norm
  gradients become float noise (measured: 10% apart between 1 and 4
  devices), so tests of training would test nothing."""
  c.data.name = "synthetic"
  c.data.height, c.data.width = 64, 128
  c.data.eval_images = 4
  c.model.latent_channels = 8
  c.model.widths = (4, 6, 8)
  c.model.analysis_blocks = 1
  c.model.recon_blocks = 1
  c.model.hyper_channels = 4
  c.sweep.alphas = (0.01, 0.1)
  c.train.batch_size = 8
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


_SELECT = {"reconstruction": ("loss", "bpp_enhancement", "psnr"),
           "segmentation": ("loss", "bpp_enhancement", "miou")}


def validate(c: ml_collections.ConfigDict) -> None:
  """One-line UserErrors for values the code would only trip over later."""
  # Here, not at the top: config files import this module, and the task
  # objects import jax and the models.
  from tcr_jax import bases
  task = bases.for_config(c)  # an unknown task.base: a UserError
  checks = [
      ("sweep.methods", c.sweep.methods, ("baseline", "proposal"), True),
      ("sweep.standalone_mode", c.sweep.standalone_mode, ("scratch", "refit"), False),
      ("task.enhancement", c.task.enhancement, ("reconstruction", "segmentation"), False),
      ("task.enhancement_rate_pixels", c.task.enhancement_rate_pixels, ("full", "half"), False),
      ("model.likelihood_bound", c.model.likelihood_bound, ("clamp", "lower_bound"), False),
      ("train.lr_schedule", c.train.lr_schedule, ("constant", "cosine"), False),
      ("train.base_select", c.train.base_select, task.select_metrics, False),
      ("train.enhancement_select", c.train.enhancement_select,
       _SELECT.get(c.task.enhancement, ()), False),
  ]
  for name, value, allowed, many in checks:
    for v in (value if many else (value,)):
      if v not in allowed:
        raise UserError(f"config.{name}={v!r}; expected one of "
                        f"{', '.join(map(repr, allowed))}")
  alphas = c.sweep.alphas
  if (isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__len__") or not alphas
      or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0
                 for a in alphas)):
    raise UserError(f"config.sweep.alphas={alphas!r}; expected a tuple of positive "
                    "numbers, e.g. --config.sweep.alphas=\"(0.01, 0.1)\"")
  if not isinstance(c.sweep.beta, (int, float)) or c.sweep.beta < 0:
    raise UserError(f"config.sweep.beta={c.sweep.beta!r}; expected a number >= 0")
  for name in ("base_patience", "enhancement_patience"):
    if c.train[name] < 0:
      raise UserError(f"config.train.{name} must be >= 0 (0: no early stopping)")
  split = c.eval.get("split", "validation")
  if split not in ("validation", "test"):
    raise UserError(f"config.eval.split={split!r}; expected 'validation' or 'test'")
  if split == "test" and c.data.name != "synthetic":
    raise UserError(f"config.eval.split='test' needs labelled test images; "
                    f"{c.data.name} has none here (use 'validation')")
  width = c.task.get("segmentation_width", 1.0)
  if not (isinstance(width, (int, float)) and 0 < width <= 1):
    raise UserError(f"config.task.segmentation_width={width!r}; expected a number in (0, 1]")
  if width != 1 and (c.init.get("segmentation_backbone") or c.init.get("segmentation_head")):
    raise UserError("torchvision's segmentation weights (config.init.segmentation_*) "
                    "need config.task.segmentation_width=1")
  detector = c.task.get("detector") or {}
  width = detector.get("width", 1.0)
  if not (isinstance(width, (int, float)) and 0 < width <= 1):
    raise UserError(f"config.task.detector.width={width!r}; expected a number in (0, 1]")
  if width != 1 and c.init.get("detection_head"):
    raise UserError("torchvision's detection weights (config.init.detection_head) "
                    "need config.task.detector.width=1")
  if c.train.get("warmup_steps", 0) < 0:
    raise UserError("config.train.warmup_steps must be >= 0 (0: no warm-up)")
  if (c.train.get("base_pretrain_steps", 0) < 0
      or not c.train.get("finetune_lr_scale", 1.0) > 0):
    raise UserError("config.train.base_pretrain_steps must be >= 0 and "
                    "config.train.finetune_lr_scale > 0")
  task.check_config()


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' the way --config does."""
  import importlib.util
  import os
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
