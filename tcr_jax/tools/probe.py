"""`tcr-jax probe WORKDIR`: the V-information of every trained base latent.

For each finished base model of a depth workdir (stages base_<method>_alpha<a>,
their result checkpoints): its quantized latent Y_b on the first training
and validation images, then, per family of tcr_jax.tools.v_information and per
target the data carries (the input image, the disparity, the segmentation
labels), I_V(Y_b -> Z) in bits per target element. Records go to
WORKDIR/v_information.json (merged by stage, target and family, so a rerun
replaces only what it measured; the sweep never deletes the file), a table
to v_information.md and the plots to vinfo_<target>.png (I_V against the
base rate and against the base task's distortion, per method and family).

Detection workdirs are refused: a detection target is a set of boxes, and a
"simple decoder" family for it would be a detector head, which is neither
simple nor a likelihood model with an empty-input member.
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np

from tcr_jax import bases, checkpoints
from tcr_jax.errors import UserError
from tcr_jax.tools import compression, v_information

RESULTS = "v_information.json"
TARGETS = ("image", "disparity", "labels")
DISPARITY_STEP = 1.0 / 256.0  # Cityscapes' disparity pngs: (p - 1) / 256 px
_STAGE = re.compile(r"base_(baseline|proposal)_alpha(.+)")


def base_stages(workdir: str) -> list[str]:
  """Finished base models (not the demo's shared starts), by method, alpha."""
  names = [n for n in checkpoints.finished_stages(workdir) if _STAGE.fullmatch(n)]
  key = lambda n: (_STAGE.fullmatch(n).group(1), float(_STAGE.fullmatch(n).group(2)))
  return sorted(names, key=key)


def data_targets(batch: dict, ignore_index: int, num_classes: int,
                 names=TARGETS) -> list[v_information.Target]:
  """The targets a batch of the training layout carries."""
  out = []
  if "image" in names:
    image = batch["image"]
    out.append(v_information.Target("image", "gaussian", image,
                                    np.ones(image.shape[:3], bool), 1.0 / 255.0))
  if "disparity" in names and "disparity" in batch:
    out.append(v_information.Target("disparity", "gaussian",
                                    batch["disparity"][..., None], batch["valid"],
                                    DISPARITY_STEP))
  if "labels" in names and "labels" in batch:
    labels = batch["labels"]
    out.append(v_information.Target("labels", "categorical", labels,
                                    labels != ignore_index, classes=num_classes))
  return out


def _read(dataset, count: int, batch: int = 32) -> dict:
  count = min(count, len(dataset))
  parts = [dataset.batch(range(i, min(i + batch, count)))
           for i in range(0, count, batch)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _latents(base, variables, images: np.ndarray, batch: int = 32) -> np.ndarray:
  import jax
  encode = jax.jit(lambda v, x: base.apply(v, x, method=base.encode)[0])
  return np.concatenate([np.asarray(encode(variables, images[i:i + batch]))
                         for i in range(0, len(images), batch)])


def _base_results(workdir: str) -> dict[str, dict]:
  """Stage name -> its results.json record (rate and task metrics)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    records = json.load(f)
  return {f"base_{r['method']}_alpha{r['alpha']:g}": r for r in records
          if r.get("layer") == "base"}


def load_records(workdir: str) -> list[dict]:
  return checkpoints.read_json(os.path.join(workdir, RESULTS), [])


def probe_workdir(workdir: str, *, families=v_information.FAMILIES,
                  targets=TARGETS, steps: int = 1000, train_images: int = 512,
                  val_images: int = 128, seed: int = 0, budget_check: bool = False,
                  stages=(), learning_rate: float | None = None, log=print) -> list[dict]:
  """Measures and writes the records of every base model; returns them all
  (the file's, updated)."""
  config = checkpoints.workdir_config(workdir)
  if not bases.is_depth(config):
    raise UserError(f"{workdir} is a {bases.name(config)} workdir; the probes "
                    "measure depth base layers only (docs/v_information.md)")
  bad = sorted(set(families) - set(v_information.FAMILIES))
  if bad:
    raise UserError(f"unknown family {bad[0]!r}; choose from "
                    f"{', '.join(v_information.FAMILIES)}")
  bad = sorted(set(targets) - set(TARGETS))
  if bad:
    raise UserError(f"unknown target {bad[0]!r}; choose from {', '.join(TARGETS)}")
  finished = base_stages(workdir)
  if not finished:
    raise UserError(f"no finished base models in {workdir}/stages; train with "
                    "python -m tcr_jax.main first")
  missing = [s for s in stages if s not in finished]
  if missing:
    raise UserError(f"no finished base model {missing[0]!r} in {workdir}; "
                    f"choose from {', '.join(finished)}")
  stages = [s for s in finished if s in stages] if stages else finished
  if steps < 1 or train_images < 2 or val_images < 1:
    raise UserError("--steps and --val-images must be >= 1, --train-images >= 2")
  t0 = time.time()
  task = bases.for_config(config)
  train = _read(task.dataset("train"), train_images)
  val = _read(task.dataset("validation"), val_images)
  args = (config.task.ignore_index, config.task.num_classes, targets)
  train_t, val_t = data_targets(train, *args), data_targets(val, *args)
  log(f"probe: {len(train['image'])} training and {len(val['image'])} "
      f"validation images read in {time.time() - t0:.0f}s; "
      f"{len(stages)} base models x {len(families)} families x "
      f"{len(train_t)} targets, {steps} steps each")
  results = _base_results(workdir)
  records = {(r["stage"], r["target"], r["family"]): r for r in load_records(workdir)}
  for stage in stages:
    t_stage = time.time()
    _, (base, variables), _, _ = compression.load_models(workdir, stage)
    y_train = _latents(base, variables, train["image"])
    y_val = _latents(base, variables, val["image"])
    method, alpha = _STAGE.fullmatch(stage).groups()
    res = results.get(stage, {})
    for family in families:
      for tt, tv in zip(train_t, val_t):
        r = v_information.estimate(family, y_train, tt, y_val, tv, steps=steps,
                                   seed=seed, learning_rate=learning_rate)
        if budget_check:
          r2 = v_information.estimate(family, y_train, tt, y_val, tv,
                                      steps=2 * steps, seed=seed,
                                      learning_rate=learning_rate)
          r["bits_at_twice_the_steps"] = r2["bits"]
        records[stage, tt.name, family] = {
            "stage": stage, "method": method, "alpha": float(alpha),
            "bpp_base": res.get("bpp_base"), "depth_rmse": res.get("depth_rmse"),
            "psnr_from_base": res.get("psnr_from_base"), **r}
    _write(workdir, records)  # after each base model: a stopped run keeps them
    log(f"probe: {stage}: " + ", ".join(
        f"{t.name}/{f} {records[stage, t.name, f]['bits']:.3f}"
        for f in families for t in train_t) + f" bits ({time.time() - t_stage:.0f}s)")
  out = _write(workdir, records)
  write_report(out, workdir, _reference_psnr(workdir))
  return out


def _write(workdir: str, records: dict) -> list[dict]:
  out = sorted(records.values(), key=lambda r: (r["target"], r["family"],
                                                 r["method"], r["alpha"]))
  checkpoints.write_json(os.path.join(workdir, RESULTS), out)
  return out


def _reference_psnr(workdir: str) -> float | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    ref = [r for r in json.load(f) if r.get("layer") == "reference"]
  return ref[0].get("mean_image_psnr") if ref else None


def write_report(records: list[dict], workdir: str,
                 mean_image_psnr: float | None = None) -> str:
  """v_information.md (a table) and vinfo_<target>.png; returns the table."""
  keys = sorted({(r["target"], r["family"]) for r in records})
  lines = ["# Usable information of the base latents (bits per target element)",
           "", "I_V(Y_b -> Z) = H_V(Z | 0) - H_V(Z | Y_b) on the validation "
           "images, 95% bootstrap interval (docs/v_information.md).", ""]
  head = "| method | alpha | bpp_base | depth_rmse |"
  head += "".join(f" {t} ({f}) |" for t, f in keys)
  if mean_image_psnr is not None:
    head += " (PSNR from base - mean image) / 6.02 |"
  lines += [head, "|" + " --- |" * (head.count("|") - 1)]
  rows = sorted({(r["method"], r["alpha"]) for r in records})
  by = {(r["method"], r["alpha"], r["target"], r["family"]): r for r in records}
  for method, alpha in rows:
    first = next(r for r in records if (r["method"], r["alpha"]) == (method, alpha))
    cells = [method, f"{alpha:g}", _num(first.get("bpp_base")),
             _num(first.get("depth_rmse"))]
    for t, f in keys:
      r = by.get((method, alpha, t, f))
      cells.append(f"{r['bits']:.3f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]"
                   if r else "-")
    if mean_image_psnr is not None:
      psnr = first.get("psnr_from_base")
      cells.append(_num(None if psnr is None else (psnr - mean_image_psnr) / 6.02))
    lines.append("| " + " | ".join(cells) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "v_information.md"), "w") as f:
    f.write(text)
  _plots(records, workdir)
  return text


def _num(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def _plots(records, workdir) -> None:
  from matplotlib.figure import Figure
  for target in sorted({r["target"] for r in records}):
    rs = [r for r in records if r["target"] == target]
    fig = Figure(figsize=(10, 3.6))
    for ax, x, label in ((fig.add_subplot(1, 2, 1), "bpp_base", "base bpp"),
                         (fig.add_subplot(1, 2, 2), "depth_rmse",
                          "base depth RMSE (px)")):
      for method, family in sorted({(r["method"], r["family"]) for r in rs}):
        pts = sorted((r[x], r["bits"]) for r in rs if r["method"] == method
                     and r["family"] == family and r.get(x) is not None)
        if pts:
          ax.plot(*zip(*pts), "o-" if family == "linear" else "s--",
                  label=f"{method} ({family})")
      ax.set_xlabel(label)
      ax.set_ylabel(f"I_V(Y_b -> {target}) (bits)")
      ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"vinfo_{target}.png"), dpi=100)
