"""A small end-to-end run on the embedded synthetic scenes (CPU friendly).

Trains a narrow ImageCodec (g_a, mean-scale hyperprior, g_s) for a few
hundred steps on synthetic street scenes, evaluates it on the validation
split, compares against JPEG at a similar rate, and writes:

  OUTPUT/data.png      a contact sheet of the data (image, disparity, labels)
  OUTPUT/preview.png   validation inputs and their reconstructions
  OUTPUT/summary.json  the measured figures
"""
from __future__ import annotations

import io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcr_jax import models
from tcr_jax.codec import entropy
from tcr_jax.data.synthetic import SyntheticScenes

BATCH = 8
EVAL_IMAGES = 32
LMBDA = 0.01  # 255^2 * MSE weight; CompressAI's 0.0130 is quality ~5


def _images(ds: SyntheticScenes, indices) -> np.ndarray:
  return ds.batch(indices)["image"].astype(np.float32) / 255.0


def _jpeg_point(images: np.ndarray, target_bpp: float) -> dict:
  """JPEG (PIL, 4:2:0) at the quality whose mean bpp is closest to target."""
  from PIL import Image
  best = None
  for q in range(5, 96, 5):
    total_bits, psnrs = 0, []
    for img in images:
      u8 = (img * 255).round().astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(u8).save(buf, "JPEG", quality=q)
      total_bits += 8 * buf.tell()
      dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 255
      psnrs.append(-10 * np.log10(max(np.mean((dec - img) ** 2), 1e-10)))
    h, w = images.shape[1:3]
    point = {"quality": q, "bpp": total_bits / len(images) / (h * w),
             "psnr": float(np.mean(psnrs))}
    if best is None or abs(point["bpp"] - target_bpp) < abs(best["bpp"] - target_bpp):
      best = point
  return best


def _save_preview(path: str, x: np.ndarray, x_hat: np.ndarray) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(x)
  fig, axes = plt.subplots(n, 2, figsize=(8, 2.2 * n), squeeze=False)
  for i in range(n):
    for j, (img, title) in enumerate(((x[i], "input"), (x_hat[i], "decoded"))):
      axes[i, j].imshow(np.clip(img, 0, 1))
      axes[i, j].set_title(title, fontsize=8)
      axes[i, j].axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(output_dir: str, steps: int = 300, height: int = 64, width: int = 128,
        seed: int = 0) -> dict:
  """Trains, evaluates and writes the demo outputs; returns the summary."""
  os.makedirs(output_dir, exist_ok=True)
  from tcr_jax.data import preview
  preview.write_contact_sheet(os.path.join(output_dir, "data.png"), num=4,
                              height=2 * height, width=2 * width, seed=seed)
  train_ds = SyntheticScenes("train", height, width, seed)
  val_ds = SyntheticScenes("validation", height, width, seed)
  model = models.ImageCodec(latent_channels=64, widths=(16, 32, 64), blocks=1,
                            hyper_channels=32)
  x0 = _images(train_ds, range(BATCH))
  params = model.init(jax.random.key(seed), jnp.asarray(x0))["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  opt_state = tx.init(params)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"ImageCodec with {n_params:,} parameters on {jax.default_backend()}; "
        f"{steps} steps of batch {BATCH} at {height}x{width}", flush=True)

  @jax.jit
  def train_step(params, opt_state, x):
    def loss_fn(p):
      x_hat, lik = model.apply({"params": p}, x, train=True)
      return models.rate_distortion_loss(x, x_hat, lik, LMBDA)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  @jax.jit
  def eval_step(params, x):
    x_hat, lik = model.apply({"params": params}, x)
    return x_hat, entropy.bits(lik), models.psnr(x, x_hat)

  start = time.perf_counter()
  for step in range(1, steps + 1):
    x = jnp.asarray(_images(train_ds, range(step * BATCH, (step + 1) * BATCH)))
    params, opt_state, loss, aux = train_step(params, opt_state, x)
    if step % 50 == 0 or step == steps:
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}")
      elapsed = time.perf_counter() - start
      psnr = -10 * np.log10(float(aux["mse"]))
      print(f"step {step:4d}/{steps}  loss {loss:.4f}  bpp {float(aux['bpp']):.3f}"
            f"  psnr {psnr:.2f} dB  {step * BATCH / elapsed:.1f} img/s"
            f"  eta {elapsed / step * (steps - step):.0f}s", flush=True)
  train_s = time.perf_counter() - start

  bits, psnrs, xs, x_hats = [], [], [], []
  for i in range(0, EVAL_IMAGES, BATCH):
    x = _images(val_ds, range(i, i + BATCH))
    x_hat, b, p = eval_step(params, jnp.asarray(x))
    bits.append(np.asarray(b))
    psnrs.append(np.asarray(p))
    xs.append(x)
    x_hats.append(np.asarray(x_hat))
  xs, x_hats = np.concatenate(xs), np.concatenate(x_hats)
  bpp = float(np.concatenate(bits).mean() / (height * width))
  summary = {
      "steps": steps, "height": height, "width": width, "train_seconds": round(train_s, 1),
      "validation_images": EVAL_IMAGES,
      "codec": {"bpp_estimated": round(bpp, 4),
                "psnr": round(float(np.concatenate(psnrs).mean()), 2)},
      "jpeg": _jpeg_point(xs, bpp),
  }
  _save_preview(os.path.join(output_dir, "preview.png"), xs[:4], x_hats[:4])
  with open(os.path.join(output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary))
  print(f"wrote {output_dir}/data.png, preview.png, summary.json")
  return summary
