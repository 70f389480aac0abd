"""Detection benchmark: Faster R-CNN ResNet-50 FPN v2 training step and
inference, tcr_jax against torchvision in the same run.

    python -m tcr_jax.bench detection [--batch 2 --height 800 --width 1344
        --steps 5 --torch-modes eager,compile]

tcr_jax: one jitted training step (forward with both samplers, the four
losses, backward, SGD with momentum 0.9 and weight decay 1e-4 on what
torchvision trains by default, i.e. conv1, bn1 and layer1 frozen) and one
jitted inference (proposals, RoI heads, NMS, 100 detections), timed after
a warm-up that includes compilation. torchvision (when torch is
importable): the same model with weights=None, the same frozen layers and
optimiser, min_size / max_size equal to the canvas so nothing is resized,
eager and, if asked, torch.compile'd. Random images, 8 random ground-truth
boxes per image. One JSON line per (impl, mode): images_per_s, step_ms,
warmup_s, peak_gib, batch, height, width, backend, device.

No TensorFlow is imported; torch only if present and asked for.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

from tcr_jax.data.detection import random_batch
from tcr_jax.tasks import faster_rcnn, init_variables


def _peak_gib():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


def _row(impl: str, mode: str, dt: float, warmup: float, batch: int,
         height: int, width: int, backend: str, device: str, peak) -> dict:
  return {"impl": impl, "mode": mode, "images_per_s": round(batch / dt, 3),
          "step_ms": round(dt * 1e3, 1), "warmup_s": round(warmup, 1),
          "peak_gib": peak, "batch": batch, "height": height, "width": width,
          "backend": backend, "device": device}


def _time(fn, steps: int, warmup: int) -> tuple[float, float]:
  t = time.perf_counter()
  for _ in range(warmup):
    fn()
  warm = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t) / steps, warm


def run_jax(batch: int, height: int, width: int, steps: int, warmup: int = 1,
            modes: Sequence[str] = ("train", "infer"),
            overrides: dict[str, Any] | None = None) -> list[dict]:
  """Times the tcr_jax train step and / or inference."""
  import jax
  import jax.numpy as jnp
  import optax
  model = faster_rcnn.FasterRCNN(**(overrides or {}))
  variables = init_variables(model)
  images, boxes, labels = random_batch(batch, height, width)
  targets = {"boxes": jnp.asarray(boxes), "labels": jnp.asarray(labels),
             "mask": jnp.ones(labels.shape, bool)}
  x = jnp.asarray(images)
  backend, device = jax.default_backend(), jax.devices()[0].device_kind
  rows = []
  if "train" in modes:
    tx = faster_rcnn.freeze_untrainable(
        optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.02, 0.9)),
        variables["params"])
    fresh = jax.tree.map(jnp.copy, variables)  # the step donates its state
    state = (fresh["params"], fresh["batch_stats"], tx.init(fresh["params"]),
             jax.random.key(0))

    def step(state, x, targets):
      params, stats, opt_state, key = state
      key, sub = jax.random.split(key)

      def loss_fn(p):
        losses, new = model.apply({"params": p, "batch_stats": stats}, x,
                                  train=True, targets=targets, rng=sub,
                                  mutable=["batch_stats"])
        return sum(losses.values()), new["batch_stats"]

      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), stats, opt_state, key), loss

    step = jax.jit(step, donate_argnums=0)
    box = {"state": state}

    def train_once():
      box["state"], loss = step(box["state"], x, targets)
      jax.block_until_ready(loss)

    dt, warm = _time(train_once, steps, warmup)
    rows.append(_row("tcr_jax", "train", dt, warm, batch, height, width,
                     backend, device, _peak_gib()))
    del box
  if "infer" in modes:
    infer = jax.jit(lambda v, x: model.apply(v, x))
    dt, warm = _time(lambda: jax.block_until_ready(infer(variables, x)),
                     steps, warmup)
    rows.append(_row("tcr_jax", "infer", dt, warm, batch, height, width,
                     backend, device, _peak_gib()))
  return rows


def run_torch(batch: int, height: int, width: int, steps: int,
              warmup: int = 1, modes: Sequence[str] = ("train", "infer"),
              torch_mode: str = "eager") -> list[dict]:
  """Times torchvision's model (eager or torch.compile)."""
  import torch
  from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                     min_size=height, max_size=width).to(dev)
  for name, p in model.backbone.body.named_parameters():
    if name.startswith(("conv1", "bn1", "layer1")):
      p.requires_grad_(False)  # torchvision's default with pretrained weights
  images, boxes, labels = random_batch(batch, height, width)
  x = [torch.from_numpy(im.transpose(2, 0, 1)).to(dev) for im in images]
  targets = [{"boxes": torch.from_numpy(b).to(dev),
              "labels": torch.from_numpy(l).long().to(dev)}
             for b, l in zip(boxes, labels)]
  forward = torch.compile(model) if torch_mode == "compile" else model
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  backend = dev.type
  device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
  impl = f"torchvision_{torch_mode}"
  rows = []
  if "train" in modes:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()

    def train_once():
      loss = sum(forward(x, targets).values())
      opt.zero_grad()
      loss.backward()
      opt.step()
      sync()

    dt, warm = _time(train_once, steps, warmup)
    rows.append(_row(impl, "train", dt, warm, batch, height, width, backend,
                     device, None))
  if "infer" in modes:
    model.eval()

    def infer_once():
      with torch.no_grad():
        forward(x)
      sync()

    dt, warm = _time(infer_once, steps, warmup)
    rows.append(_row(impl, "infer", dt, warm, batch, height, width, backend,
                     device, None))
  return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--height", type=int, default=800)
  p.add_argument("--width", type=int, default=1344)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--modes", default="train,infer", help="train, infer or both")
  p.add_argument("--torch-modes", default="eager",
                 help="comma list of eager, compile; 'none' skips torchvision")


def run(args: argparse.Namespace):
  """Yields the JSON rows: tcr_jax first, then each torchvision mode
  (skipped with a note when torch is not importable)."""
  modes = [m for m in args.modes.split(",") if m]
  yield from run_jax(args.batch, args.height, args.width, args.steps,
                     args.warmup, modes)
  torch_modes = [m for m in args.torch_modes.split(",") if m and m != "none"]
  if not torch_modes:
    return
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    yield {"impl": "torchvision", "skipped": "torch / torchvision not importable"}
    return
  for torch_mode in torch_modes:
    try:
      yield from run_torch(args.batch, args.height, args.width, args.steps,
                           args.warmup, modes, torch_mode)
    except Exception as e:  # torch.compile of the detector may fail  # pylint: disable=broad-except
      yield {"impl": f"torchvision_{torch_mode}",
             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
