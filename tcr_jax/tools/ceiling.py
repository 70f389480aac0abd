"""The base task's ceiling: the depth head trained on the uncompressed image.

`tcr-jax ceiling --config=... --workdir=WORKDIR` trains the base model's
depth path without the codec: the half-resolution image (the input the
base's g_s hands the head, here uncompressed) -> LRASPP MobileNetV3-L ->
x2 nearest -> 5x5 conv -> disparity, the same head and output layer as
models.DepthBase, on the same augmented training batches, learning rate and
batch size as the config's base stages. Every `eval_every` steps it
measures the depth RMSE on the validation images (all valid pixels, and
the pixels of people and vehicles); the best evaluation is the ceiling (its
weights measured again on config.eval.split when that is "test").
It stops early after config.train.base_patience evaluations without a
better RMSE (0: never). The result goes to WORKDIR/ceiling.json, which the
report (rd.py) sets next to the base models as the best depth any base
model of this size and training could reach at infinite rate.

No checkpoints: it is a reference figure, minutes long on the demo's scenes.
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcr_jax import bases, checkpoints
from tcr_jax.codec import layers, ops
from tcr_jax.data import labels as label_ids
from tcr_jax.data.loader import Loader
from tcr_jax.errors import UserError
from tcr_jax.reporting import rd
from tcr_jax.tasks import LRASPPMobileNetV3, losses

RESULT = rd.CEILING


class DepthCeiling(nn.Module):
  """The depth head of models.DepthBase on the uncompressed image."""
  disparity_scale: float = 128.0
  depth_bn_momentum: float = 0.01  # torch convention, as DepthBase's

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    padded, _ = ops.pad_to_multiple(x, 32)
    half = ops.downsample_2x(padded)
    d = LRASPPMobileNetV3(num_classes=1, backbone_bn_momentum=1.0 - self.depth_bn_momentum
                          )(half, train=train)["out"]
    d = layers.conv(1, 5)(ops.upsample_nearest_2x(d))
    return self.disparity_scale * d[:, :x.shape[1], :x.shape[2], 0]


def _squared_errors(pred, batch) -> dict[str, float]:
  sq = (np.asarray(pred, np.float64) - batch["disparity"]) ** 2
  valid = batch["valid"]
  objects = valid & label_ids.object_mask(batch["labels"])
  return {"sq": float(sq[valid].sum()), "n": float(valid.sum()),
          "sq_objects": float(sq[objects].sum()), "n_objects": float(objects.sum())}


def train_ceiling(config, workdir: str, steps: int, eval_every: int = 250,
                  log=print) -> dict:
  """Trains the ceiling; writes and returns its record."""
  if not bases.is_depth(config):
    raise UserError("the ceiling is the depth head's; this config's base task "
                    f"is {bases.name(config)}")
  if steps < 1 or eval_every < 1:
    raise UserError("--steps and --eval-every must be >= 1")
  loader = Loader(config)
  model = DepthCeiling(config.task.disparity_scale, config.task.depth_bn_momentum)
  c = config
  first = loader.host_train_batch("ceiling", 0)
  # Jitted, and the rate an argument rather than a constant: the compiled
  # programs depend on the shapes only (the persistent compilation cache
  # serves every rate).
  variables = jax.jit(model.init)(jax.random.key(c.seed), jnp.asarray(first["image"][:1]))
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=c.train.learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, disparity, valid):
    def loss_fn(p):
      pred, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                              mutable=["batch_stats"])
      return losses.depth_loss(pred, disparity, valid), new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  predict = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x))
  count = c.data.eval_images

  def evaluate(params, stats, dataset=loader.val_data) -> dict[str, float]:
    total: dict[str, float] = {}
    b = c.eval.batch_size
    for start in range(0, count, b):
      batch = dataset.batch(range(start, min(start + b, count)))
      for k, v in _squared_errors(predict(params, stats, batch["image"]), batch).items():
        total[k] = total.get(k, 0.0) + v
    return {"depth_rmse": float(np.sqrt(total["sq"] / max(total["n"], 1.0))),
            "depth_rmse_objects": (float(np.sqrt(total["sq_objects"] / total["n_objects"]))
                                   if total["n_objects"] else None)}

  t0 = time.time()
  best, best_step, since = None, 0, 0
  for i in range(1, steps + 1):
    b = first if i == 1 else loader.host_train_batch("ceiling", i - 1)
    params, stats, opt_state, loss = step(params, stats, opt_state, b["image"],
                                          b["disparity"], b["valid"])
    if i % eval_every == 0 or i == steps:
      m = evaluate(params, stats)
      objects = m["depth_rmse_objects"]
      log(f"ceiling: step {i}/{steps} train RMSE {float(loss):.3f} validation "
          f"{m['depth_rmse']:.4f}, on objects "
          f"{'-' if objects is None else f'{objects:.4f}'} ({time.time() - t0:.0f}s)")
      if best is None or m["depth_rmse"] < best["depth_rmse"]:
        best, best_step, since = m, i, 0
        kept = (params, stats)
      else:
        since += 1
        if 0 < c.train.base_patience <= since:
          log(f"ceiling: no better validation RMSE in {since} evaluations; stopping")
          break
  if loader.report_split != "validation":  # chosen on validation, reported on test
    best = evaluate(*kept, dataset=loader.report_data)
  record = {"layer": "reference", "method": "ceiling", **best,
            "best_step": best_step, "trained_steps": i, "steps": steps,
            "eval_images": count, "split": loader.report_split,
            "seconds": round(time.time() - t0, 1)}
  os.makedirs(workdir, exist_ok=True)
  checkpoints.write_json(os.path.join(workdir, RESULT), record)
  return record


def load(workdir: str) -> dict | None:
  return checkpoints.read_json(os.path.join(workdir, RESULT))
