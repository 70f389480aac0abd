"""The depth base task: LRASPP MobileNetV3-Large on g_s's output predicts
disparity (configs/depth_recon.py, configs/depth_seg.py).

Batches are in the scene layout of tcr_jax.data (image, disparity, valid,
labels); D_b is the depth RMSE in disparity pixels; the evaluator reports
depth RMSE over all valid pixels and over those of people and vehicles.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tcr_jax import data
from tcr_jax.bases.base import (SEGMENTATION_WEIGHTS, BaseTask, base_objective,
                                enhancement_objective, load_pretrained,
                                png_bytes)
from tcr_jax.errors import UserError
from tcr_jax.model import evaluate, models, objectives
from tcr_jax.reporting import previews, references

PyTree = Any

# The depth head's pretrained networks (config.init): an ImageNet backbone
# (the authors' start) or the whole head.
DEPTH_WEIGHTS = (
    ("depth_backbone", ("head", "backbone"), "mobilenet_v3_large"),
    ("depth_head", ("head",), "lraspp_mobilenet_v3_large"))

REFERENCE_NAMES = ("constant_disparity_rmse", "mean_disparity_rmse",
                   "mean_disparity_rmse_objects", "mean_image_psnr")


class Task(BaseTask):
  """Depth estimation (module docstring)."""

  metrics = ("depth_rmse", "depth_rmse_objects")
  select_metrics = ("loss", "bpp_base", "depth_rmse", "psnr_from_base")
  reference_names = REFERENCE_NAMES

  def check_config(self) -> None:
    if not 0.0 < self.config.task.depth_bn_momentum <= 1.0:
      raise UserError("config.task.depth_bn_momentum must be in (0, 1] (torch "
                      "convention: the weight of each new batch; torchvision's 0.01)")

  def dataset(self, split: str):
    return data.scene_dataset(self.config, split)

  def base_model(self) -> models.DepthBase:
    c = self.config
    m = c.model
    return models.DepthBase(
        latent_channels=m.latent_channels, widths=tuple(m.widths),
        analysis_blocks=m.analysis_blocks, task_blocks=m.task_blocks,
        recon_blocks=m.recon_blocks, entropy_model_name=c.entropy_model,
        hyper_channels=m.hyper_channels, quantizer=m.quantizer,
        likelihood_bound=m.likelihood_bound,
        disparity_scale=c.task.disparity_scale,
        depth_bn_momentum=c.task.depth_bn_momentum,
        compute_dtype=m.compute_dtype)

  def base_loss_fn(self, model, variables, batch, rng, hp, frozen=None,
                   train: bool = True):
    """L_b on a batch (tcr_jax/model/objectives.py)."""
    del frozen
    out, state = model.apply(
        variables, batch["image"], train=train,
        rec_gate=objectives.reconstruction_gate(hp["beta"]),
        rngs={"noise": rng}, mutable=["batch_stats"])
    return base_objective(objectives.base_terms(out, batch), hp, state)

  def enhancement_loss_fn(self, model, base, variables, batch, rng, hp,
                          frozen, train: bool = True):
    """L_e on a batch, given the frozen base variables."""
    x = batch["image"]
    y_b, lik_b = jax.lax.stop_gradient(base.apply(frozen, x, method="encode"))
    noise, dropout = jax.random.split(rng)
    out, state = model.apply(variables, x, y_b * hp["side_gate"], train=train,
                             rngs={"noise": noise, "dropout": dropout},
                             mutable=["batch_stats"])
    t = self.config.task
    distortion = objectives.enhancement_distortion(
        out, batch, t.enhancement, t.num_classes, t.ignore_index, t.aux_weight)
    pixels = objectives.rate_pixels(x.shape[1], x.shape[2],
                                    t.enhancement_rate_pixels)
    terms = objectives.enhancement_terms(lik_b, out["likelihoods"], distortion,
                                         pixels)
    return enhancement_objective(terms, hp, state)

  def init_variables(self, base, enhancement, kind: str, key) -> PyTree:
    c = self.config
    x = jnp.zeros((1, c.data.height, c.data.width, 3), jnp.float32)
    if kind == "base":
      return load_pretrained(jax.jit(base.init)(key, x), c.init, DEPTH_WEIGHTS)
    y_b = jnp.zeros(base.latent_shape(c.data.height, c.data.width))
    variables = jax.jit(enhancement.init)(key, x, y_b)
    if c.task.enhancement == "segmentation":
      variables = load_pretrained(variables, c.init, SEGMENTATION_WEIGHTS)
    return variables

  def evaluator(self, base, enhancement, loader, mesh):
    return evaluate.Evaluator(self.config, base, enhancement, loader, mesh)

  def initial_weights_note(self) -> str | None:
    c = self.config
    scratch = []
    if not (c.init.depth_backbone or c.init.depth_head):
      scratch.append("the depth head (config.init.depth_backbone)")
    if c.task.enhancement == "segmentation" and not (
        c.init.segmentation_backbone or c.init.segmentation_head):
      scratch.append("the segmentation head (config.init.segmentation_backbone)")
    if not scratch:
      return None
    verb = "starts" if len(scratch) == 1 else "start"
    return (f"note: {' and '.join(scratch)} {verb} from random weights; the "
            "authors start from torchvision's ImageNet backbones (README: "
            "tcr-jax import-torchvision)")

  def trivial_references(self, loader, eval_images: int) -> dict:
    """The values of REFERENCE_NAMES (tcr_jax/reporting/references.py)."""
    return references.trivial_references(
        loader.train_data, loader.report_data,
        self.config.eval.get("reference_train_images", 0), eval_images)

  def save_preview(self, path: str, base_out: dict, enh_out: dict) -> None:
    previews.save_preview(path, base_out, enh_out, self.config.task.enhancement)

  def decoded_files(self, out: dict) -> dict[str, bytes]:
    """disparity.png (Cityscapes' 16-bit encoding), reconstruction.png
    (the enhancement's, upsampled to the input's size, when decoded; else
    the one read off the base), segmentation.png (train ids) when the
    enhancement segments."""
    h, w = out["height"], out["width"]
    pngs = {}
    disparity = np.asarray(out["disparity"])[0]
    # Cityscapes' encoding: p = 256 * disparity + 1 (0 = invalid), 16-bit.
    pngs["disparity.png"] = png_bytes(
        np.clip(np.round(disparity * 256 + 1), 1, 65535).astype(np.uint16))
    if "x_hat" in out:
      half = np.asarray(out["x_hat"])[0]
      img = Image.fromarray((np.clip(half, 0, 1) * 255).round().astype(np.uint8))
      pngs["reconstruction.png"] = png_bytes(
          np.asarray(img.resize((w, h), Image.Resampling.BICUBIC)))
    else:
      pngs["reconstruction.png"] = png_bytes(
          (np.clip(np.asarray(out["x_rec"])[0], 0, 1) * 255).round().astype(np.uint8))
    if "logits" in out:
      labels = np.asarray(out["logits"]["out"])[0].argmax(-1).astype(np.uint8)
      pngs["segmentation.png"] = png_bytes(labels)
    return pngs

  def bench_batch(self, batch: int, height: int, width: int):
    x = jax.random.uniform(jax.random.key(0), (batch, height, width, 3))
    disparity = jax.random.uniform(jax.random.key(1), (batch, height, width)) * 100
    valid = jax.random.uniform(jax.random.key(2), (batch, height, width)) > 0.2
    return {"image": x, "disparity": disparity, "valid": valid}, x[:1]
