"""A toy fourth base task, defined here alone: does the latent see objects?

The base layer's task head (the depth base's network, its one output channel
read as a logit) segments the pixels of people and vehicles from the rest;
D_b is the binary cross-entropy ("task_loss"), the metric the objects' IoU.
Everything else (data, enhancement, coder) is the framework's. A config
selects it with config.task.base = "toy_base" (tests/toy_recon_config.py),
with no edit to tcr_jax: tests/test_toy_base.py runs its :smoke sweep.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics

from tcr_jax import data
from tcr_jax.model import evaluate, models, objectives
from tcr_jax.bases.base import (BaseTask, base_objective, enhancement_objective,
                                png_bytes)
from tcr_jax.codec import entropy
from tcr_jax.data import labels as label_ids
from tcr_jax.reporting import previews


def _object_logits(out):
  return out["disparity"]


def _objects(batch):
  return label_ids.object_mask(batch["labels"]).astype(jnp.float32)


class ToyEvaluator(evaluate.Evaluator):
  """The base layer's metrics: bpp_base, object_iou, psnr_from_base."""

  def metric_collection(self, kind):
    if kind != "base":
      return super().metric_collection(kind)
    mean = metrics.Average.from_output
    return metrics.Collection.create(
        bpp_base=mean("bpp"), intersection=mean("intersection"),
        union=mean("union"), task_loss=mean("task_loss"),
        psnr_from_base=mean("psnr"), rec_rmse255=mean("rec_rmse255"))

  def _outputs(self, kind, variables, batch, hp, frozen):
    if kind != "base":
      return super()._outputs(kind, variables, batch, hp, frozen)
    x = batch["image"]
    out = self.base.apply(variables, x, train=False)
    logits, target = _object_logits(out), _objects(batch)
    pred = (logits > 0).astype(jnp.float32)
    return ({"bpp": entropy.bits(out["likelihoods"]) / (x.shape[1] * x.shape[2]),
             "intersection": jnp.sum(pred * target, axis=(1, 2)),
             "union": jnp.sum(jnp.maximum(pred, target), axis=(1, 2)),
             "task_loss": jnp.mean(_bce(logits, target), axis=(1, 2)),
             "psnr": objectives.psnr(x, out["x_rec"]),
             "rec_rmse255": objectives.rmse_255_per_image(x, out["x_rec"])},
            {"disparity": logits, "x_rec": out["x_rec"], "image": x,
             "gt_disparity": target, "valid": batch["valid"]})

  def summarise(self, stage, values, collector):
    if stage.kind != "base":
      return super().summarise(stage, values, collector)
    v = {k: float(x) for k, x in values.items()}
    terms = {"bpp": v["bpp_base"], "task_loss": v["task_loss"],
             "rec_rmse255": v["rec_rmse255"]}
    return {"bpp_base": v["bpp_base"],
            "object_iou": v["intersection"] / max(v["union"], 1e-9),
            "psnr_from_base": v["psnr_from_base"],
            "loss": float(objectives.base_loss(terms, stage.hp["alpha"],
                                               stage.hp.get("beta", 0.0)))}


def _bce(logits, target):
  return jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


class Task(BaseTask):
  """Object segmentation (module docstring)."""

  metrics = ("object_iou",)
  select_metrics = ("loss", "bpp_base", "object_iou", "psnr_from_base")

  def dataset(self, split):
    return data.scene_dataset(self.config, split)

  def base_model(self):
    m = self.config.model
    return models.DepthBase(
        latent_channels=m.latent_channels, widths=tuple(m.widths),
        analysis_blocks=m.analysis_blocks, task_blocks=m.task_blocks,
        recon_blocks=m.recon_blocks, entropy_model_name=self.config.entropy_model,
        hyper_channels=m.hyper_channels, disparity_scale=1.0)

  def base_loss_fn(self, model, variables, batch, rng, hp, frozen=None,
                   train=True):
    out, state = model.apply(
        variables, batch["image"], train=train,
        rec_gate=objectives.reconstruction_gate(hp["beta"]),
        rngs={"noise": rng}, mutable=["batch_stats"])
    x = batch["image"]
    terms = {"bpp": entropy.bpp(out["likelihoods"], x.shape[1] * x.shape[2]),
             "task_loss": jnp.mean(_bce(_object_logits(out), _objects(batch))),
             "rec_rmse255": objectives.rmse_255(x, out["x_rec"])}
    return base_objective(terms, hp, state)

  def enhancement_loss_fn(self, model, base, variables, batch, rng, hp, frozen,
                          train=True):
    x = batch["image"]
    y_b, lik_b = jax.lax.stop_gradient(base.apply(frozen, x, method="encode"))
    out, state = model.apply(variables, x, y_b * hp["side_gate"], train=train,
                             rngs={"noise": rng}, mutable=["batch_stats"])
    distortion = objectives.rmse_255(out["target"], out["x_hat"])
    pixels = objectives.rate_pixels(x.shape[1], x.shape[2], "full")
    terms = objectives.enhancement_terms(lik_b, out["likelihoods"], distortion,
                                         pixels)
    return enhancement_objective(terms, hp, state)

  def init_variables(self, base, enhancement, kind, key):
    c = self.config
    x = jnp.zeros((1, c.data.height, c.data.width, 3), jnp.float32)
    if kind == "base":
      return jax.jit(base.init)(key, x)
    y_b = jnp.zeros(base.latent_shape(c.data.height, c.data.width))
    return jax.jit(enhancement.init)(key, x, y_b)

  def evaluator(self, base, enhancement, loader, mesh):
    return ToyEvaluator(self.config, base, enhancement, loader, mesh)

  def save_preview(self, path, base_out, enh_out):
    previews.save_preview(path, base_out, enh_out, "reconstruction")

  def decoded_files(self, out):
    mask = (np.asarray(out["disparity"])[0] > 0).astype(np.uint8) * 255
    image = np.asarray(out.get("x_rec"))[0]
    return {"objects.png": png_bytes(mask),
            "reconstruction.png": png_bytes(
                (np.clip(image, 0, 1) * 255).round().astype(np.uint8))}
