"""The detection base task: Faster R-CNN ResNet-50 FPN v2 on g_s's output
(configs/detection_recon.py). `Task` is built from these pieces:

  base_loss_fn, enhancement_loss_fn   L_b and L_e on detection batches
                                      (tcr_jax/model/objectives.py: the detector's
                                      four losses as D_b, per-image rates,
                                      the authors' normalised-space RMSE)
  freeze_detector(tx, n)              torchvision's frozen backbone layers
                                      (conv1, bn1, layer1 for n = 3)
  init_variables(base, enh, config)   the two layers' initial variables
                                      (config.init.detection_head: an
                                      `import-torchvision` checkpoint)
  detection_input, detection_files    what `tcr-jax compress` codes (the
                                      detector's resized input) and what
                                      `decompress` writes (detections.json)
  DetectionEvaluator                  bpp, PSNR and COCO mAP (pycocotools,
                                      tcr_jax/model/coco_eval.py) on the
                                      validation split, real file sizes

Batches are in the layout of tcr_jax.data.detection.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from tcr_jax import data
from tcr_jax.bases.base import (BaseTask, base_objective, enhancement_objective,
                                load_pretrained, png_bytes)
from tcr_jax.codec import bitstream, files
from tcr_jax.data.detection import random_batch, resized_size
from tcr_jax.errors import UserError
from tcr_jax.model import coco_eval, evaluate, models_detection, objectives
from tcr_jax.reporting import previews
from tcr_jax.tasks.faster_rcnn import trainable_mask

PyTree = Any

# The detector's pretrained weights (config.init): torchvision's COCO model.
DETECTOR_WEIGHTS = (("detection_head", ("head",), "fasterrcnn_resnet50_fpn_v2"),)


def _targets(batch) -> dict[str, jax.Array]:
  return {"boxes": batch["boxes"], "labels": batch["labels"],
          "mask": batch["box_mask"]}


def base_loss_fn(model, variables, batch, rng, hp, frozen=None,
                 train: bool = True):
  """L_b on a detection batch: (loss, (metrics, new batch statistics))."""
  del frozen
  noise, sampler = jax.random.split(rng)
  out, state = model.apply(
      variables, batch["image"], batch["image_size"], train=train,
      rec_gate=objectives.reconstruction_gate(hp["beta"]),
      targets=_targets(batch), rngs={"noise": noise, "sampler": sampler},
      mutable=["batch_stats"])
  return base_objective(objectives.detection_base_terms(out, batch), hp, state)


def enhancement_loss_fn(model, base, config, variables, batch, rng, hp,
                        frozen, train: bool = True):
  """L_e on a detection batch, given the frozen base variables."""
  del config
  x, sizes = batch["image"], batch["image_size"]
  y_b, lik_b = jax.lax.stop_gradient(
      base.apply(frozen, x, sizes, method="encode"))
  out, state = model.apply(variables, x, y_b * hp["side_gate"], train=train,
                           image_sizes=sizes, rngs={"noise": rng},
                           mutable=["batch_stats"])
  terms = objectives.detection_enhancement_terms(lik_b, out["likelihoods"],
                                                 out["x_hat"], batch)
  return enhancement_objective(terms, hp, state)


def freeze_detector(tx, trainable_backbone_layers: int = 3):
  """`tx` on every base parameter but the detector backbone's layers that
  torchvision freezes (tasks.faster_rcnn.trainable_mask), which get zero
  updates."""

  def labels(params):
    out = {k: jax.tree.map(lambda _: "train", v) for k, v in params.items()}
    out["head"] = jax.tree.map(
        lambda t: "train" if t else "freeze",
        trainable_mask(params["head"], trainable_backbone_layers))
    return out

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               labels)


def init_variables(base, enhancement, config, kind: str, key) -> PyTree:
  """Initial variables of a stage kind; the models are fully
  convolutional, so a 64x64 input shapes them."""
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  if kind == "base":
    return load_pretrained(jax.jit(base.init)(key, x), config.init,
                           DETECTOR_WEIGHTS)
  y_b = jnp.zeros(base.latent_shape(64, 64))
  return jax.jit(enhancement.init)(key, x, y_b)


# --------------------------------------------------------------------------
# Evaluation.


class _Collector:
  """Host copies of every validation batch's ground truth and detections."""

  def __init__(self, crowd: str):
    self.acc = coco_eval.Accumulator(crowd)

  def add(self, batch, outputs) -> None:
    host = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()
            if k in coco_eval_keys()}
    dets = {k: np.asarray(jax.device_get(outputs[f"det_{k}"]))
            for k in ("boxes", "scores", "labels")}
    self.acc.add(host, dets)


def coco_eval_keys():
  return ("image_id", "image_size", "orig_size", "boxes", "labels",
          "box_mask", "crowd", "weight")


class DetectionEvaluator(evaluate.Evaluator):
  """The Evaluator with the detection base's metrics:

    base         bpp_base (per image's resized pixels), psnr_from_base
                 (pixel space, the image's pixels), map, map50 (COCOeval,
                 original coordinates), loss = alpha * bpp + beta * 255 *
                 RMSE: in evaluation the detector returns detections, not
                 losses (torchvision, and the authors' validation "rate
                 distortion"), so results are picked by validation mAP
    enhancement  bpp_enhancement, bpp_base, psnr (pixel space), loss = L_e
                 with the normalised-space RMSE
  """

  def metric_collection(self, kind: str):
    from clu import metrics
    mean = metrics.Average.from_output
    if kind == "base":
      return metrics.Collection.create(
          bpp_base=mean("bpp"), psnr_from_base=mean("psnr"),
          rec_rmse255=mean("rec_rmse255"))
    return evaluate.metric_collection(kind, "reconstruction")

  def _outputs(self, kind, variables, batch, hp, frozen):
    x, sizes = batch["image"], batch["image_size"]
    canvas = x.shape[1:3]
    if kind == "base":
      out = self.base.apply(variables, x, sizes, train=False)
      q = {"bpp": objectives.bpp_per_image(out["likelihoods"], sizes, canvas),
           "psnr": objectives.masked_psnr(x, out["x_rec"], sizes),
           "rec_rmse255": objectives.normalized_rmse_255_per_image(
               x, out["x_rec"], sizes)}
      # Flat (the previews keep them): detections and the ground truth.
      kept = {"x_rec": out["x_rec"], "image": x, "image_size": sizes,
              **{f"det_{k}": v for k, v in out["detections"].items()},
              **{f"gt_{k}": batch[k] for k in ("boxes", "labels", "box_mask")}}
      return q, kept
    y_b, lik_b = self.base.apply(frozen, x, sizes, method="encode")
    out = self.enh.apply(variables, x, y_b * hp["side_gate"], train=False,
                         image_sizes=sizes)
    q = {"bpp": objectives.bpp_per_image(out["likelihoods"], sizes, canvas),
         "bpp_base": objectives.bpp_per_image(lik_b, sizes, canvas),
         "psnr": objectives.masked_psnr(x, out["x_hat"], sizes),
         "rmse255": objectives.normalized_rmse_255_per_image(
             x, out["x_hat"], sizes)}
    return q, {"x_hat": out["x_hat"], "image": x}

  def host_collector(self, stage):
    if stage.kind != "base":
      return None
    return _Collector(self.config.task.crowd_eval)

  def summarise(self, stage, values: dict, collector) -> dict[str, float]:
    if stage.kind != "base":
      return evaluate.summarise(stage.kind, values, stage.hp)
    v = {k: float(x) for k, x in values.items()}
    terms = {"bpp": v["bpp_base"], "rec_rmse255": v["rec_rmse255"],
             "detection_loss": 0.0}
    return {"bpp_base": v["bpp_base"], "psnr_from_base": v["psnr_from_base"],
            **collector.acc.result(),
            "loss": float(objectives.base_loss(terms, stage.hp["alpha"],
                                               stage.hp.get("beta", 0.0)))}

  def actual_rates(self, stage, variables: PyTree) -> dict:
    """Real files of the first eval.actual_bits_images report-split images,
    each coded alone at its resized size (not the canvas), in bits per
    resized pixel; the base stream counts the container header."""
    n = min(self.config.eval.actual_bits_images,
            self.config.data.eval_images, len(self.loader.report_data))
    if n <= 0 or jax.process_index() != 0:
      return {}
    bpp = []
    for i in range(n):
      one = self.loader.report_data.batch([i])
      h, w = (int(v) for v in one["image_size"][0])
      img = one["image"][0, :h, :w]
      if stage.kind == "base":
        data = files.compress_layers(self.base, variables, img)
      else:
        _, base_info = files.encode_layer(self.base, stage.frozen, img)
        side = base_info["y_hat"] if stage.hp["side_gate"] > 0 else None
        streams, _ = files.encode_layer(self.enh, variables, img, side=side)
        data = bitstream.join_streams(streams)
      bpp.append(8 * len(data) / (h * w))
    key = "bpp_actual_base" if stage.kind == "base" else "bpp_actual_enhancement"
    # The mean of per-image bpp, as the estimate.
    return {key: float(np.mean(bpp)), "actual_images": n}


def check_config(config) -> None:
  """One-line UserErrors for the detection fields."""
  t = config.task
  if t.crowd_eval not in coco_eval.CROWD_MODES:
    raise UserError(f"config.task.crowd_eval={t.crowd_eval!r}; expected one "
                    f"of {', '.join(map(repr, coco_eval.CROWD_MODES))}")
  if not 0 <= t.trainable_backbone_layers <= 5:
    raise UserError("config.task.trainable_backbone_layers must be in 0..5")
  if config.data.name == "synthetic" and (config.data.height % 32
                                          or config.data.width % 32):
    raise UserError("detection on the synthetic scenes needs config.data."
                    "height and width multiples of 32")
  if config.task.enhancement != "reconstruction":
    raise UserError("the detection experiment's enhancement is "
                    "reconstruction (config.task.enhancement)")


# --------------------------------------------------------------------------
# tcr-jax compress / decompress.


def detection_input(config, rgb: np.ndarray) -> np.ndarray:
  """The image a detection workdir codes: resized as the detector's input
  (torchvision's min_size / max_size rule of config.data, bilinear), in
  8-bit RGB. Detections are reported in its pixels."""
  h, w = resized_size(rgb.shape[0], rgb.shape[1], config.data.min_size,
                      config.data.max_size)
  if (h, w) == rgb.shape[:2]:
    return rgb
  return np.asarray(Image.fromarray(rgb).resize((w, h),
                                                Image.Resampling.BILINEAR))


def detection_files(out: dict) -> dict[str, bytes]:
  """detections.json (boxes x1 y1 x2 y2 in the coded image's pixels, COCO
  category ids, scores) and reconstruction.png (the enhancement's when
  decoded, else the one read off the base), at the coded size."""
  dets = {k: np.asarray(v)[0] for k, v in out["detections"].items()}
  found = dets["scores"] > 0
  listing = [{"box": [round(float(c), 2) for c in box], "label": int(label),
              "score": round(float(score), 5)}
             for box, label, score in zip(dets["boxes"][found],
                                          dets["labels"][found],
                                          dets["scores"][found])]
  image = np.asarray(out.get("x_hat", out["x_rec"]))[0]
  return {"detections.json": json.dumps(
              {"height": out["height"], "width": out["width"],
               "detections": listing}, indent=1).encode(),
          "reconstruction.png": png_bytes(
              (np.clip(image, 0, 1) * 255).round().astype(np.uint8))}


# --------------------------------------------------------------------------
# The task object.


class Task(BaseTask):
  """Object detection (module docstring)."""

  metrics = ("map", "map50")
  select_metrics = ("loss", "bpp_base", "map", "map50", "psnr_from_base")

  def check_config(self) -> None:
    check_config(self.config)

  def dataset(self, split: str):
    return data.detection_dataset(self.config, split)

  def base_model(self):
    return models_detection.detection_base_model(self.config)

  def enhancement_options(self) -> dict[str, Any]:
    # The enhancement codes what the detector reads: the full-resolution,
    # normalised canvas (the authors').
    return {"half_resolution": False, "normalize_input": True}

  def base_loss_fn(self, model, variables, batch, rng, hp, frozen=None,
                   train: bool = True):
    return base_loss_fn(model, variables, batch, rng, hp, frozen, train)

  def enhancement_loss_fn(self, model, base, variables, batch, rng, hp,
                          frozen, train: bool = True):
    return enhancement_loss_fn(model, base, self.config, variables, batch, rng,
                               hp, frozen, train)

  def base_optimizer(self, tx):
    return freeze_detector(tx, self.config.task.trainable_backbone_layers)

  def init_variables(self, base, enhancement, kind: str, key) -> PyTree:
    return init_variables(base, enhancement, self.config, kind, key)

  def evaluator(self, base, enhancement, loader, mesh):
    return DetectionEvaluator(self.config, base, enhancement, loader, mesh)

  def initial_weights_note(self) -> str | None:
    if not self.config.init.detection_head:
      return ("note: the detector starts from random weights; the authors "
              "start from torchvision's COCO weights (config.init."
              "detection_head; README: tcr-jax import-torchvision)")
    return None

  def save_preview(self, path: str, base_out: dict, enh_out: dict) -> None:
    previews.save_detection_preview(path, base_out, enh_out)

  def coded_input(self, rgb: np.ndarray) -> np.ndarray:
    return detection_input(self.config, rgb)

  def decoded_files(self, out: dict) -> dict[str, bytes]:
    return detection_files(out)

  def bench_batch(self, batch: int, height: int, width: int):
    _, boxes, labels = random_batch(batch, height, width)
    x = jax.random.uniform(jax.random.key(0), (batch, height, width, 3))
    sizes = jnp.tile(jnp.array([[height, width]], jnp.int32), (batch, 1))
    return ({"image": x, "image_size": sizes,
             "boxes": jnp.asarray(boxes),
             "labels": jnp.asarray(labels), "box_mask": jnp.ones(labels.shape, bool)},
            x[:1, :64, :64])
