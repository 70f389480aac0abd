"""Evaluation of a stage's model on the validation split, and real file sizes.

Per batch, a jitted step computes the layer's outputs and the per-image (or
per-batch) quantities that clu.metrics collections accumulate; padding
images (weight 0) are masked out. The collections are merged on the host in
float64 and turned into the stage's metrics, whose "loss" is the paper's
objective (tcr_jax/model/objectives.py) evaluated on the pooled terms:

  base         bpp_base, depth_rmse (pooled over valid pixels),
               depth_rmse_objects (over the valid pixels of people and
               vehicles: does the model see objects?), psnr_from_base,
               loss = L_b
  enhancement  bpp_enhancement, bpp_base (None where R_b is not part of
               the layer's rate), psnr (reconstruction) or miou
               (segmentation), loss = L_e; rates per
               config.task.enhancement_rate_pixels

`actual_rates` compresses validation images to real range-coded files with
the same models (tcr_jax.codec.files) and reports their bits per pixel.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics
from jax.sharding import NamedSharding, PartitionSpec as P

from tcr_jax import checkpoints
from tcr_jax.codec import entropy
from tcr_jax.codec import bitstream, files
from tcr_jax.data import labels as label_ids
from tcr_jax.model import objectives
from tcr_jax.tasks import losses

PyTree = Any


@flax.struct.dataclass
class PooledRMSE(metrics.Metric):
  """sqrt(sum of squared errors / count) over every valid pixel."""
  total: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_model_output(cls, depth_sq, depth_count, mask, **_):
    return cls(jnp.sum(depth_sq * mask), jnp.sum(depth_count * mask))

  def merge(self, other):
    return type(self)(self.total + other.total, self.count + other.count)

  def compute(self):
    return np.sqrt(self.total / max(float(self.count), 1.0))


@flax.struct.dataclass
class ObjectRMSE(PooledRMSE):
  """PooledRMSE over the valid pixels of objects (label_ids.OBJECT_TRAIN_IDS);
  NaN (None in the records) where the images have none."""

  @classmethod
  def from_model_output(cls, object_sq, object_count, mask, **_):
    return cls(jnp.sum(object_sq * mask), jnp.sum(object_count * mask))

  def compute(self):
    return super().compute() if float(self.count) > 0 else np.nan


@flax.struct.dataclass
class Confusion(metrics.Metric):
  """A summed confusion matrix (rows ground truth, columns prediction)."""
  matrix: jnp.ndarray

  @classmethod
  def from_model_output(cls, confusion, **_):
    return cls(confusion)

  def merge(self, other):
    return type(self)(self.matrix + other.matrix)

  def compute(self):
    return self.matrix


def _mean(name):
  return metrics.Average.from_output(name)


def metric_collection(kind: str, task: str):
  if kind == "base":
    return metrics.Collection.create(
        bpp_base=_mean("bpp"), depth_rmse=PooledRMSE,
        depth_rmse_objects=ObjectRMSE,
        psnr_from_base=_mean("psnr"), rec_rmse255=_mean("rec_rmse255"))
  if task == "reconstruction":
    return metrics.Collection.create(
        bpp_enhancement=_mean("bpp"), bpp_base=_mean("bpp_base"),
        psnr=_mean("psnr"), distortion=_mean("rmse255"))
  return metrics.Collection.create(
      bpp_enhancement=_mean("bpp"), bpp_base=_mean("bpp_base"),
      confusion=Confusion, distortion=_mean("seg_loss"))


def _finite(x):
  return None if x is None or not np.isfinite(x) else x


def summarise(kind: str, values: dict, hp: dict, ignore_index: int = -1
              ) -> dict[str, float]:
  """The stage's metrics, with the loss from the paper's objective."""
  values = dict(values)
  if "confusion" in values:
    values["miou"] = losses.miou(jnp.asarray(values.pop("confusion")),
                                 ignore_index)
  v = {k: float(x) for k, x in values.items()}
  if kind == "base":
    terms = {"bpp": v["bpp_base"], "depth_rmse": v["depth_rmse"],
             "rec_rmse255": v["rec_rmse255"]}
    return {"bpp_base": v["bpp_base"], "depth_rmse": v["depth_rmse"],
            "depth_rmse_objects": _finite(v.get("depth_rmse_objects")),
            "psnr_from_base": v["psnr_from_base"],
            "loss": float(objectives.base_loss(terms, hp["alpha"],
                                               hp.get("beta", 0.0)))}
  base_rate = hp["base_rate"]
  out = {"bpp_enhancement": v["bpp_enhancement"],
         "bpp_base": v["bpp_base"] if base_rate > 0 else None}
  out.update({k: v[k] for k in ("psnr", "miou") if k in v})
  out["loss"] = float(objectives.enhancement_loss(
      {"bpp_base": v["bpp_base"], "bpp_enhancement": v["bpp_enhancement"],
       "distortion": v["distortion"]}, hp["alpha"], base_rate))
  return out


class Evaluator:
  """Compiled evaluation steps of an experiment's two layers."""

  def __init__(self, config, base, enhancement, loader, mesh):
    self.config = config
    self.base, self.enh = base, enhancement
    self.loader = loader
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self._compiled: dict[str, Callable] = {}

  def _outputs(self, kind, variables, batch, hp, frozen):
    """(per-image quantities for the metrics, outputs kept for previews)."""
    c = self.config
    x = batch["image"]
    pixels = x.shape[1] * x.shape[2]
    if kind == "base":
      out = self.base.apply(variables, x, train=False)
      sq = jnp.where(batch["valid"], (out["disparity"] - batch["disparity"]) ** 2, 0.)
      objects = batch["valid"] & label_ids.object_mask(batch["labels"])
      return ({"bpp": entropy.bits(out["likelihoods"]) / pixels,
               "depth_sq": jnp.sum(sq, axis=(1, 2)),
               "depth_count": jnp.sum(batch["valid"], axis=(1, 2)).astype(jnp.float32),
               "object_sq": jnp.sum(jnp.where(objects, sq, 0.), axis=(1, 2)),
               "object_count": jnp.sum(objects, axis=(1, 2)).astype(jnp.float32),
               "psnr": objectives.psnr(x, out["x_rec"]),
               "rec_rmse255": objectives.rmse_255_per_image(x, out["x_rec"])},
              {"disparity": out["disparity"], "x_rec": out["x_rec"], "image": x,
               "gt_disparity": batch["disparity"], "valid": batch["valid"]})
    y_b, lik_b = self.base.apply(frozen, x, method="encode")
    out = self.enh.apply(variables, x, y_b * hp["side_gate"], train=False)
    pixels = objectives.rate_pixels(x.shape[1], x.shape[2],
                                    c.task.enhancement_rate_pixels)
    q = {"bpp": entropy.bits(out["likelihoods"]) / pixels,
         "bpp_base": entropy.bits(lik_b) / pixels}
    if c.task.enhancement == "reconstruction":
      q["psnr"] = objectives.psnr(out["target"], out["x_hat"])
      q["rmse255"] = objectives.rmse_255_per_image(out["target"], out["x_hat"])
      return q, {"x_hat": out["x_hat"], "image": x}
    labels = jnp.where(batch["weight"][:, None, None] > 0, batch["labels"],
                       c.task.ignore_index)
    pred = jnp.argmax(out["logits"]["out"], axis=-1)
    q["confusion"] = losses.confusion_matrix(pred, labels, c.task.num_classes,
                                             c.task.ignore_index)
    loss = objectives.enhancement_distortion(
        out, {"labels": labels}, "segmentation", c.task.num_classes,
        c.task.ignore_index, c.task.aux_weight)
    q["seg_loss"] = jnp.broadcast_to(loss, x.shape[:1])
    return q, {"segmentation": pred, "image": x}

  # Hooks for experiments whose metrics need more than the pooled
  # collections (the detection evaluator, tcr_jax/detection.py).
  def metric_collection(self, kind: str):
    return metric_collection(kind, self.config.task.enhancement)

  def host_collector(self, stage):
    """An object whose add(batch, outputs) sees every validation batch on
    the host, or None."""
    del stage
    return None

  def summarise(self, stage, values: dict, collector) -> dict[str, float]:
    del collector
    return summarise(stage.kind, values, stage.hp, self.config.task.ignore_index)

  def eval_fn(self, kind: str) -> Callable:
    if kind not in self._compiled:
      collection = self.metric_collection(kind)

      def step(variables, batch, hp, frozen):
        q, kept = self._outputs(kind, variables, batch, hp, frozen)
        return collection.single_from_model_output(mask=batch["weight"], **q), kept

      r, b = self.replicated, self.batch_sharding
      self._compiled[kind] = jax.jit(step, in_shardings=(r, b, r, r),
                                     out_shardings=(r, r))
    return self._compiled[kind]

  def evaluate(self, stage, variables: PyTree, count: int,
               keep_outputs: int = 0, split: str = "validation"
               ) -> tuple[dict[str, float], dict]:
    """Metrics of `variables` on the first `count` images of `split` (the
    validation split, or the loader's report split), and the outputs of the
    first `keep_outputs` of them (previews). A collective: every process
    calls it, each reading its share of the images."""
    fn = self.eval_fn(stage.kind)
    # Without the training-only lr_scale: one compiled evaluation for every
    # stage of a kind, fine-tunes included.
    hp = {k: jnp.float32(v) for k, v in stage.hp.items() if k != "lr_scale"}
    total = None
    kept: dict[str, list] = {}
    collector = self.host_collector(stage)
    for batch in self.loader.val_batches(count, split):
      update, outputs = fn(variables, batch, hp, stage.frozen)
      update = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float64),
                            update)
      total = update if total is None else total.merge(update)
      if collector is not None:
        collector.add(batch, outputs)
      if keep_outputs and sum(map(len, kept.get("image", []))) < keep_outputs:
        for k, v in outputs.items():  # replicated: every process holds them
          kept.setdefault(k, []).append(np.asarray(v))
    kept = {k: np.concatenate(v)[:keep_outputs] for k, v in kept.items()}
    return self.summarise(stage, total.compute(), collector), kept

  def actual_rates(self, stage, variables: PyTree) -> dict:
    """Real file sizes: the first eval.actual_bits_images images of the
    report split (config.eval.split)
    compressed with the range coder, in bits per full-resolution pixel; the
    base stream counts the container header. Process 0 codes (on its own
    devices, from host copies of the replicated variables) while the others
    wait at a barrier, and every process receives the figures."""
    from jax.experimental import multihost_utils
    n = min(self.config.eval.actual_bits_images,
            self.config.data.eval_images, len(self.loader.report_data))
    if n <= 0:
      return {}
    bpp = self._actual_bpp(stage, variables, n) if jax.process_index() == 0 else 0.0
    checkpoints.wait_for_all_processes(f"{stage.name} actual rates")
    if jax.process_count() > 1:
      bpp = float(multihost_utils.broadcast_one_to_all(np.float64(bpp)))
    key = "bpp_actual_base" if stage.kind == "base" else "bpp_actual_enhancement"
    return {key: bpp, "actual_images": n}

  def _actual_bpp(self, stage, variables: PyTree, n: int) -> float:
    host = lambda tree: jax.tree.map(np.asarray, tree)
    variables, frozen = host(variables), host(stage.frozen)
    images = self.loader.report_data.batch(range(n))["image"]
    pixels = objectives.rate_pixels(
        images.shape[1], images.shape[2],
        "full" if stage.kind == "base" else self.config.task.enhancement_rate_pixels)
    total = 0.0
    for img in images:
      if stage.kind == "base":
        total += 8 * len(files.compress_layers(self.base, variables, img))
        continue
      _, base_info = files.encode_layer(self.base, frozen, img)
      side = base_info["y_hat"] if stage.hp["side_gate"] > 0 else None
      streams, _ = files.encode_layer(self.enh, variables, img, side=side)
      total += 8 * len(bitstream.join_streams(streams))
    return total / n / pixels
