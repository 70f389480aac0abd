"""The experiment: `train_and_evaluate(config, workdir)` runs the whole sweep.

For every alpha of config.sweep.alphas:
  1. base layers, one per method: baseline (beta 0: the reconstruction
     decoder trains on stop_gradient of the latent) and proposal (beta > 0);
  2. each base frozen, a conditional enhancement layer on its latent;
  3. one standalone enhancement (side information zeroed): trained from
     scratch, or (config.sweep.standalone_mode "refit", the authors') the
     last conditional enhancement of this alpha with only its entropy model
     refitted.
Each trained model is evaluated on config.eval.split (the validation split,
or "test", scenes that no choice saw) and becomes one record of
results.json; rd.py then writes bd_rate.md and the RD plots, and previews/
gets the outputs of that split's first images. Early stopping and the choice
of a stage's result use the validation split only.

With train.base_pretrain_steps > 0 (the demo's warm starts, fields only the
synthetic variants have: configs_lib.warm_starts), each method first
trains one start at the first alpha (stage base_start_METHOD_alphaA, that
many steps), and each of its base models fine-tunes that start for
train.base_steps at train.finetune_lr_scale times the learning rate: a warm
start per method, the same number of steps for every model. With
train.finetune_chain, only the first alpha's model fine-tunes the start, and
each later one the model of the alpha before it (each lower-rate model warm
starts from the next higher-rate one).

Stages live in WORKDIR/stages/NAME (tcr_jax/training/train.py); running the same
command again skips finished stages and resumes the one in progress.
TensorFlow (clu's TensorBoard writer) is only imported here, at run time.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from tcr_jax import bases, checkpoints
from tcr_jax import configs_lib
from tcr_jax.errors import UserError
from tcr_jax.reporting import poster, rd
from tcr_jax.training import train


def stage_name(kind: str, method: str, alpha: float) -> str:
  return f"{kind}_{method}_alpha{alpha:g}"


def record(c, layer: str, method: str, alpha: float, beta, m: dict,
           task_metrics: tuple[str, ...]) -> dict:
  """One line of results.json; task_metrics: the base task's (its
  `metrics`: depth RMSE, detection mAP, ...)."""
  enh_metric = "psnr" if c.task.enhancement == "reconstruction" else "miou"
  return {
      "experiment": c.experiment, "layer": layer, "method": method,
      "alpha": alpha, "beta": beta,
      "bpp_base": m.get("bpp_base"),
      "bpp_enhancement": m.get("bpp_enhancement") if layer == "enhancement" else None,
      **{k: m.get(k) for k in task_metrics},
      "psnr_from_base": m.get("psnr_from_base"),
      enh_metric: m.get(enh_metric),
      "loss": m.get("loss"),
      # Real file sizes on the first `actual_images` images of the split.
      "bpp_actual_base": m.get("bpp_actual_base"),
      "bpp_actual_enhancement": m.get("bpp_actual_enhancement"),
      "actual_images": m.get("actual_images"),
      "split": c.eval.get("split", "validation"),  # the images measured
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> list[dict]:
  """Runs the whole sweep; returns the records written to results.json."""
  c = config
  configs_lib.validate(c)
  os.makedirs(workdir, exist_ok=True)
  same_on_every_process(config, workdir)
  if c.sweep.get("bases_from"):
    adopt_bases(c, workdir, c.sweep.bases_from)
  exp = train.Experiment(config, workdir)
  # What `tcr-jax compress/decompress --workdir` rebuild the models from.
  checkpoints.write_json(os.path.join(workdir, "config.json"),
                         json.loads(config.to_json()))
  from clu import metric_writers  # imports TensorFlow: keep it here

  def writer_factory(logdir):
    return metric_writers.create_default_writer(
        logdir, just_logging=jax.process_index() > 0)

  train.log(f"{c.experiment} ({c.variant}) on {jax.device_count()} "
            f"{jax.default_backend()} device(s), {jax.process_count()} "
            f"process(es); workdir {workdir}")
  task_metrics = exp.task.metrics
  note = exp.task.initial_weights_note()
  if note:
    train.log(note)
  records = []
  reference = reference_record(c, exp)
  if reference:
    records.append(reference)
    train.log("trivial references: " + train._fmt(reference))
  previews = []
  starts = {}  # method -> the start its base models fine-tune (none: scratch)
  pretrain_steps, lr_scale, chain = warm_starts(c)
  if pretrain_steps > 0:
    # Each method trains one start at the first alpha; every base model of
    # the method, that alpha's too, fine-tunes it for train.base_steps, so
    # every base model gets the same number of steps.
    for method in c.sweep.methods:
      pstage = train.Stage(stage_name("base_start", method, c.sweep.alphas[0]),
                           "base", pretrain_steps,
                           {"alpha": c.sweep.alphas[0], "beta": _beta(c, method),
                            "lr_scale": 1.0})  # the fine-tunes' hp keys
      starts[method], _ = train.run_stage(exp, pstage, writer_factory)

  for alpha in c.sweep.alphas:
    alpha_e = alpha * c.sweep.enhancement_alpha_scale
    for method in c.sweep.methods:
      beta = _beta(c, method)
      hp = {"alpha": alpha, "beta": beta}
      start = {}
      if method in starts:
        hp["lr_scale"] = lr_scale
        start = {"init": starts[method]}
      bstage = train.Stage(stage_name("base", method, alpha), "base",
                           c.train.base_steps, hp, **start)
      base_vars, bm = train.run_stage(exp, bstage, writer_factory)
      if method in starts and chain:
        starts[method] = base_vars
      records.append(record(c, "base", method, alpha, beta, bm, task_metrics))
      estage = train.Stage(stage_name("enhancement", method, alpha),
                           "enhancement", c.train.enhancement_steps,
                           {"alpha": alpha_e, "side_gate": 1.0, "base_rate": 1.0},
                           frozen=base_vars)
      enh_vars, em = train.run_stage(exp, estage, writer_factory)
      records.append(record(c, "enhancement", method, alpha, beta,
                            {**em, **{k: bm.get(k) for k in task_metrics},
                             "psnr_from_base": bm["psnr_from_base"],
                             "bpp_actual_base": bm.get("bpp_actual_base")},
                            task_metrics))
      previews.append((alpha, method, bstage, base_vars, estage, enh_vars))
    if c.sweep.standalone:
      refit = c.sweep.standalone_mode == "refit"
      sstage = train.Stage(
          stage_name("enhancement", "standalone", alpha), "enhancement",
          c.train.enhancement_steps,
          {"alpha": alpha_e, "side_gate": 0.0, "base_rate": float(refit)},
          frozen=base_vars, init=enh_vars if refit else None,
          trainable="entropy_model" if refit else "all")
      _, sm = train.run_stage(exp, sstage, writer_factory)
      records.append(record(c, "enhancement", "standalone", alpha, None, sm,
                            task_metrics))

  checkpoints.write_json(os.path.join(workdir, "results.json"), records)
  _write_previews(exp, previews)
  reads = exp.loader.reads
  print(f"[process {jax.process_index()} of {jax.process_count()}] read "
        + " and ".join(f"{n} {split}" for split, n in reads.items())
        + " samples", flush=True)
  if jax.process_index() == 0:
    print(rd.write_report(records, workdir, c.experiment,
                          c.task.enhancement_rate_pixels,
                          poster.report_lines(records)), flush=True)
    plots = sorted(f for f in os.listdir(workdir) if f.startswith("rd_"))
    print("RD plots: " + ", ".join(os.path.join(workdir, f) for f in plots))
    print(f"previews: {os.path.join(workdir, 'previews')}/", flush=True)
  return records


# The demo's warm starts when a config has none (configs_lib.warm_starts).
NO_WARM_STARTS = {"base_pretrain_steps": 0, "finetune_lr_scale": 1.0,
                  "finetune_chain": False}


def warm_starts(c) -> tuple[int, float, bool]:
  """(train.base_pretrain_steps, finetune_lr_scale, finetune_chain)."""
  return tuple(c.train.get(k, v) for k, v in NO_WARM_STARTS.items())


def _beta(c, method: str) -> float:
  return 0.0 if method == "baseline" else c.sweep.beta


def reference_record(c, exp: train.Experiment) -> dict | None:
  """The base task's trivial references (its trivial_references; the depth
  task's: tcr_jax/reporting/references.py) as a results record; None when
  config.eval.reference_train_images is 0 or the task has none. Process 0
  computes, every process receives them."""
  names = exp.task.reference_names
  if c.eval.get("reference_train_images", 0) <= 0 or not names:
    return None
  values = np.zeros(len(names), np.float32)
  if jax.process_index() == 0:
    refs = exp.task.trivial_references(exp.loader, exp.eval_images)
    values = np.array([np.nan if refs[n] is None else refs[n] for n in names],
                      np.float32)
  checkpoints.wait_for_all_processes("trivial references")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    values = np.asarray(multihost_utils.broadcast_one_to_all(values))
  return {"experiment": c.experiment, "layer": "reference", "method": "trivial",
          "split": c.eval.get("split", "validation"),
          **{n: float(v) if np.isfinite(v) else None for n, v in zip(names, values)}}


def _write_previews(exp: train.Experiment, previews) -> None:
  """Every process evaluates (a collective); process 0 draws."""
  n = exp.config.eval.previews
  for alpha, method, bstage, bvars, estage, evars in previews:
    path = os.path.join(exp.workdir, "previews", f"alpha{alpha:g}_{method}.png")
    split = exp.loader.report_split
    # Process 0 drew the last preview while the others went on.
    checkpoints.wait_for_all_processes(f"preview alpha{alpha:g} {method}")
    _, base_out = exp.evaluator.evaluate(bstage, bvars, n, keep_outputs=n, split=split)
    _, enh_out = exp.evaluator.evaluate(estage, evars, n, keep_outputs=n, split=split)
    if jax.process_index() == 0:
      exp.task.save_preview(path, base_out, enh_out)


# The config fields that shape a depth sweep's base stages (their names,
# training and evaluation): two sweeps that agree on all of them train the
# same base models, whatever their enhancement task. A new field that
# changes the base stages belongs here.
BASE_FIELDS = (
    "seed", "data", "model", "entropy_model", "task.base", "task.disparity_scale",
    "task.depth_bn_momentum", "sweep.alphas", "sweep.methods", "sweep.beta",
    "train.batch_size", "train.learning_rate", "train.base_steps",
    "train.base_pretrain_steps", "train.finetune_lr_scale", "train.finetune_chain",
    "train.lr_schedule", "train.warmup_steps", "train.base_grad_clip",
    "train.base_select", "train.base_patience", "train.eval_every",
    "train.eval_images_during_training", "eval.actual_bits_images", "eval.split",
    "init.depth_backbone", "init.depth_head")


def _field(tree: dict, path: str):
  """The value at a dotted path of a config as JSON data (tuples as lists)."""
  for key in path.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def adopt_bases(c, workdir: str, source: str) -> list[str]:
  """config.sweep.bases_from: copies the finished base stages of the sweep
  in `source` (the same base models: every BASE_FIELDS value equal) that
  this workdir does not have yet, so that depth_seg reuses depth_recon's
  bases instead of training them again. Returns the stages copied."""
  import shutil
  if os.path.abspath(source) == os.path.abspath(workdir):
    raise UserError("config.sweep.bases_from is this workdir")
  if not bases.is_depth(c):
    raise UserError("config.sweep.bases_from is for depth sweeps")
  mine = json.loads(c.to_json())
  other = json.loads(checkpoints.workdir_config(source).to_json())
  for tree in (mine, other):  # fields a config may lack, at their defaults
    tree.setdefault("eval", {}).setdefault("split", "validation")
    for key, value in NO_WARM_STARTS.items():
      tree["train"].setdefault(key, value)
  differ = [f for f in BASE_FIELDS if _field(mine, f) != _field(other, f)]
  if differ:
    path = differ[0]
    while isinstance(_field(mine, path), dict) and isinstance(_field(other, path), dict):
      a, b = _field(mine, path), _field(other, path)
      path += "." + next(k for k in sorted({*a, *b}) if a.get(k) != b.get(k))
    raise UserError(f"config.sweep.bases_from={source!r} trained other base "
                    f"models: its {path} is {_field(other, path)!r}, "
                    f"here {_field(mine, path)!r}")
  names = [n for n in checkpoints.finished_stages(source) if n.startswith("base_")
           and not os.path.exists(os.path.join(workdir, "stages", n))]
  if jax.process_index() == 0:
    for name in names:
      shutil.copytree(os.path.join(source, "stages", name),
                      os.path.join(workdir, "stages", name))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("adopt_bases")
  if names:
    train.log(f"base stages from {source}: {', '.join(names)}")
  return names


def same_on_every_process(config, workdir: str) -> None:
  """A UserError on every process, before any training, when the processes
  were not started with the same config and workdir."""
  if jax.process_count() == 1:
    return
  import hashlib
  import numpy as np
  from jax.experimental import multihost_utils
  text = json.dumps(json.loads(config.to_json()), sort_keys=True) + os.path.abspath(workdir)
  mine = np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.int32)
  ours = multihost_utils.process_allgather(mine)  # (processes, 4)
  differ = [i for i in range(len(ours)) if not np.array_equal(ours[i], ours[0])]
  if differ:
    raise UserError(f"process(es) {', '.join(map(str, differ))} run another "
                    "config or workdir than process 0; start every process "
                    "with the same command")
