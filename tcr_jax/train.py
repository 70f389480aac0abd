"""Two-stage training and evaluation: `train_and_evaluate(config, workdir)`.

For every alpha of the sweep:
  1. base layers, one per method: baseline (beta 0: the reconstruction
     decoder trains on stop_gradient of the latent) and proposal (beta > 0);
  2. each base frozen, a conditional enhancement layer on its latent;
  3. one standalone enhancement (side information zeroed).
Each trained model is evaluated on the validation split and becomes one
record of results.json; rd.py then writes bd_rate.md and the RD plots.

Every stage lives in WORKDIR/stages/NAME: orbax checkpoints (latest, saved
asynchronously, and best by validation loss), TensorBoard scalars, and
done.json once it has finished. Running the same command again skips the
finished stages and resumes the one in progress from its latest checkpoint;
the data order and the random numbers are functions of (seed, stage, step),
so a resumed stage ends exactly where an uninterrupted one would.

Steps are jitted over a Mesh of all devices: batches are sharded along the
"data" axis with NamedSharding, parameters and optimizer state replicated,
and the train state donated. TensorFlow (clu's TensorBoard writer) is only
imported inside train_and_evaluate.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tcr_jax import models, sharding
from tcr_jax.codec import entropy, ops
from tcr_jax.data import augment, make_dataset
from tcr_jax.errors import UserError
from tcr_jax.tasks import losses

PyTree = Any


# --------------------------------------------------------------------------
# Models from the config.


def base_model(config) -> models.DepthBase:
  m = config.model
  return models.DepthBase(
      latent_channels=m.latent_channels, widths=tuple(m.widths),
      analysis_blocks=m.analysis_blocks, task_blocks=m.task_blocks,
      recon_blocks=m.recon_blocks, entropy_model=config.entropy_model,
      hyper_channels=m.hyper_channels, quantizer=m.quantizer,
      disparity_scale=config.task.disparity_scale,
      compute_dtype=m.compute_dtype)


def enhancement_model(config) -> models.Enhancement:
  m = config.model
  return models.Enhancement(
      task_name=config.task.enhancement, latent_channels=m.latent_channels,
      side_channels=m.latent_channels, widths=tuple(m.widths),
      analysis_blocks=m.analysis_blocks, task_blocks=m.task_blocks,
      recon_blocks=m.recon_blocks, context=config.enhancement_context,
      quantizer=m.quantizer, num_classes=config.task.num_classes,
      ignore_index=config.task.ignore_index, compute_dtype=m.compute_dtype)


# --------------------------------------------------------------------------
# Losses. `hp` holds the traced hyper-parameters (alpha, beta, side_gate), so
# one compiled step serves every alpha and method.


def base_objective(model, variables, batch, rng, hp, train: bool):
  """(loss to differentiate, (metrics, new batch_stats))."""
  x = batch["image"]
  gate = (hp["beta"] > 0).astype(jnp.float32)
  kwargs = dict(mutable=["batch_stats"]) if train else {}
  out = model.apply(variables, x, train=train, rec_gate=gate,
                    rngs={"noise": rng}, **kwargs)
  out, state = out if train else (out, {})
  rate = entropy.bpp(out["likelihoods"], x.shape[1] * x.shape[2])
  depth = losses.depth_loss(out["disparity"], batch["disparity"], batch["valid"])
  rec = models.rmse_255(x, out["x_rec"])
  # Baseline: the decoder still learns (weight 1) but cannot shape y.
  rec_weight = jnp.where(hp["beta"] > 0, hp["beta"], 1.0)
  loss = hp["alpha"] * rate + depth + rec_weight * rec
  objective = hp["alpha"] * rate + depth + hp["beta"] * rec
  metrics = {"loss": objective, "bpp": rate, "depth_rmse": depth,
             "rec_rmse255": rec}
  return loss, (metrics, state.get("batch_stats", variables.get("batch_stats")))


def _base_latent(bmodel, base_vars, x):
  y_hat, lik = bmodel.apply(base_vars, ops.pad_to_multiple(x, bmodel.multiple)[0],
                            method=bmodel.encode)
  return (jax.lax.stop_gradient(y_hat),
          jax.lax.stop_gradient(entropy.bpp(lik, x.shape[1] * x.shape[2])))


def enhancement_objective(model, bmodel, config, variables, base_vars, batch,
                          rng, hp, train: bool):
  x = batch["image"]
  y_b, bpp_b = _base_latent(bmodel, base_vars, x)
  side = y_b * hp["side_gate"]
  x_half = ops.downsample_2x(x)
  k1, k2 = jax.random.split(rng)
  kwargs = dict(mutable=["batch_stats"]) if train else {}
  out = model.apply(variables, x_half, side, train=train,
                    out_size=x.shape[1:3], rngs={"noise": k1, "dropout": k2},
                    **kwargs)
  out, state = out if train else (out, {})
  bpp_e = entropy.bpp(out["likelihoods"], x.shape[1] * x.shape[2])
  if config.task.enhancement == "reconstruction":
    distortion = models.rmse_255(x_half, out["x_hat"])
  else:
    distortion = losses.segmentation_loss(
        out["logits"], batch["labels"], config.task.num_classes,
        config.task.ignore_index)
  loss = hp["alpha"] * (hp["side_gate"] * bpp_b + bpp_e) + distortion
  metrics = {"loss": loss, "bpp_base": bpp_b, "bpp_enhancement": bpp_e,
             "distortion": distortion}
  return loss, (metrics, state.get("batch_stats", variables.get("batch_stats")))


# --------------------------------------------------------------------------
# Stage machinery.


@dataclasses.dataclass
class Stage:
  """One model to train: what it is, its hyper-parameters and its inputs."""
  name: str
  kind: str              # "base" or "enhancement"
  steps: int
  hp: dict[str, float]
  frozen: PyTree = None  # the base variables for an enhancement


def _hp_arrays(hp: dict[str, float]) -> dict[str, jax.Array]:
  return {k: jnp.float32(v) for k, v in hp.items()}


def _stage_seed(seed: int, name: str) -> int:
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _split_variables(variables: PyTree) -> tuple[PyTree, PyTree]:
  return variables["params"], variables.get("batch_stats", {})


class Trainer:
  """Holds the models, the mesh, the data and the compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               devices=None):
    self.config = config
    self.workdir = workdir
    self.train_data = make_dataset(config, "train")  # data errors first
    self.val_data = make_dataset(config, "validation")
    self.mesh = sharding.data_mesh(devices)
    n_dev = self.mesh.size
    for what, b in (("train.batch_size", config.train.batch_size),
                    ("eval.batch_size", config.eval.batch_size)):
      if b % n_dev:
        raise UserError(f"{what}={b} is not divisible by the {n_dev} devices")
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.eval_images = min(config.data.eval_images, len(self.val_data))
    self.base = base_model(config)
    self.enh = enhancement_model(config)
    self._compiled: dict[str, Callable] = {}
    self._initial: dict[str, PyTree] = {}

  # ------------------------------------------------------------------ data

  def host_batch(self, dataset, indices) -> dict[str, np.ndarray]:
    """This process's share of a global batch of `indices`."""
    indices = np.asarray(indices)
    share = np.array_split(indices, jax.process_count())[jax.process_index()]
    return dataset.batch(share)

  def train_batch(self, stage: Stage, step: int) -> dict[str, jax.Array]:
    c = self.config
    b = c.train.batch_size
    n = len(self.train_data)
    seed = _stage_seed(c.seed, "data")
    start = step * b
    if n >= 10**7:  # effectively infinite (synthetic): read in order
      indices = np.arange(start, start + b) % n
    else:  # a fresh permutation per epoch
      idx = []
      for g in range(start, start + b):
        epoch, pos = divmod(g, n)
        idx.append(np.random.default_rng([seed, epoch]).permutation(n)[pos])
      indices = np.array(idx)
    batch = self.host_batch(self.train_data, indices)
    rng = np.random.default_rng([_stage_seed(c.seed, stage.name), step,
                                 jax.process_index()])
    batch = augment.augment_batch(batch, rng, c.data.hflip, c.data.color_jitter)
    return self.to_global(batch)

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

  def val_batches(self, count: int):
    b = self.config.eval.batch_size
    for start in range(0, count, b):
      idx = np.arange(start, start + b)
      valid = (idx < count).astype(np.float32)
      batch = self.host_batch(self.val_data, np.minimum(idx, count - 1))
      batch["weight"] = np.array_split(valid, jax.process_count())[jax.process_index()]
      yield self.to_global(batch)

  # ------------------------------------------------------------------ init

  def init_variables(self, kind: str) -> PyTree:
    """Initial variables of a stage kind (the same for every stage of it)."""
    if kind not in self._initial:
      self._initial[kind] = self._init_variables(kind)
    return self._initial[kind]

  def _init_variables(self, kind: str) -> PyTree:
    c = self.config
    h, w = c.data.height, c.data.width
    x = jnp.zeros((1, h, w, 3), jnp.float32)
    # The rbg generator compiles initialisers ~5x faster than threefry on
    # CPU (20 s -> 4 s for g_a); the train steps keep threefry.
    key = jax.random.key(_stage_seed(c.seed, kind), impl="rbg")
    if kind == "base":
      variables = jax.jit(self.base.init)(key, x)
      if c.init.depth_head:
        variables = _load_head(variables, "head", c.init.depth_head)
      return variables
    x_half = ops.downsample_2x(x)
    m = self.base.multiple  # the base latent is 1/m of the padded image
    y_b = jnp.zeros((1, -(-h // m), -(-w // m), c.model.latent_channels))
    init = functools.partial(self.enh.init, out_size=(h, w))
    variables = jax.jit(init)(key, x_half, y_b)
    if c.init.segmentation_head and c.task.enhancement == "segmentation":
      variables = _load_head(variables, "head", c.init.segmentation_head)
    return variables

  def optimizer(self, kind: str) -> optax.GradientTransformation:
    t = self.config.train
    clip = t.base_grad_clip if kind == "base" else t.enhancement_grad_clip
    adam = optax.adam(t.learning_rate)
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam

  # ------------------------------------------------------------------ steps

  def _objective(self, kind: str, train: bool):
    if kind == "base":
      return lambda v, frozen, batch, rng, hp: base_objective(
          self.base, v, batch, rng, hp, train)
    return lambda v, frozen, batch, rng, hp: enhancement_objective(
        self.enh, self.base, self.config, v, frozen, batch, rng, hp, train)

  def train_step_fn(self, kind: str) -> Callable:
    key = f"train_{kind}"
    if key not in self._compiled:
      objective = self._objective(kind, train=True)
      tx = self.optimizer(kind)

      def step(state, batch, hp, frozen):
        rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(params):
          v = {"params": params}
          if state["batch_stats"]:
            v["batch_stats"] = state["batch_stats"]
          return objective(v, frozen, batch, rng, hp)

        (_, (metrics, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                         opt_state=opt_state, step=state["step"] + 1,
                         batch_stats=batch_stats if state["batch_stats"] else {})
        return new_state, metrics

      r, b = self.replicated, self.batch_sharding
      self._compiled[key] = jax.jit(step, in_shardings=(r, b, r, r),
                                    out_shardings=(r, r), donate_argnums=0)
    return self._compiled[key]

  def eval_fn(self, kind: str) -> Callable:
    """Per-batch sums over the images with weight 1 (padding has weight 0)."""
    key = f"eval_{kind}"
    if key in self._compiled:
      return self._compiled[key]
    c = self.config

    def evaluate(variables, batch, hp, frozen):
      x, wgt = batch["image"], batch["weight"]
      pixels = x.shape[1] * x.shape[2]
      per_image = lambda a: jnp.sum(a * wgt)
      if kind == "base":
        out = self.base.apply(variables, x, train=False)
        bits = entropy.bits(out["likelihoods"])
        sq = jnp.where(batch["valid"], (out["disparity"] - batch["disparity"]) ** 2, 0.)
        rec_mse = jnp.mean((out["x_rec"] - x) ** 2, axis=(1, 2, 3))
        sums = {"bits": per_image(bits),
                "depth_sq": per_image(jnp.sum(sq, axis=(1, 2))),
                "depth_count": per_image(jnp.sum(batch["valid"], axis=(1, 2))),
                "psnr": per_image(models.psnr(x, out["x_rec"])),
                "rec_rmse255": per_image(255 * jnp.sqrt(rec_mse + 1e-12))}
        return sums, {"disparity": out["disparity"], "x_rec": out["x_rec"]}
      y_b, lik_b = self.base.apply(
          frozen, ops.pad_to_multiple(x, self.base.multiple)[0],
          method=self.base.encode)
      bits_b = entropy.bits(lik_b)
      x_half = ops.downsample_2x(x)
      out = self.enh.apply(variables, x_half, y_b * hp["side_gate"],
                           train=False, out_size=x.shape[1:3])
      sums = {"bits": per_image(entropy.bits(out["likelihoods"])),
              "bits_base": per_image(bits_b)}
      if c.task.enhancement == "reconstruction":
        mse = jnp.mean((out["x_hat"] - x_half) ** 2, axis=(1, 2, 3))
        sums["psnr"] = per_image(models.psnr(x_half, out["x_hat"]))
        sums["rmse255"] = per_image(255 * jnp.sqrt(mse + 1e-12))
        return sums, {"x_hat": out["x_hat"]}
      labels = jnp.where(wgt[:, None, None] > 0, batch["labels"],
                         c.task.ignore_index)
      pred = jnp.argmax(out["logits"]["out"], axis=-1)
      sums["confusion"] = losses.confusion_matrix(
          pred, labels, c.task.num_classes, c.task.ignore_index)
      seg_loss = losses.segmentation_loss(out["logits"], labels,
                                          c.task.num_classes, c.task.ignore_index)
      sums["seg_loss"] = seg_loss * jnp.sum(wgt)
      return sums, {"segmentation": pred}

    r, b = self.replicated, self.batch_sharding
    self._compiled[key] = jax.jit(evaluate, in_shardings=(r, b, r, r),
                                  out_shardings=(r, r))
    return self._compiled[key]

  # ------------------------------------------------------------------ eval

  def evaluate(self, stage: Stage, variables: PyTree, count: int,
               keep_outputs: int = 0) -> tuple[dict[str, float], dict]:
    fn = self.eval_fn(stage.kind)
    hp = _hp_arrays(stage.hp)
    totals: dict[str, np.ndarray] = {}
    kept: dict[str, list] = {}
    for batch in self.val_batches(count):
      sums, outputs = fn(variables, batch, hp, stage.frozen)
      for k, v in sums.items():
        totals[k] = totals.get(k, 0) + np.asarray(jax.device_get(v), np.float64)
      if keep_outputs and sum(map(len, kept.get("image", []))) < keep_outputs:
        outputs = dict(outputs, image=batch["image"])
        for k, v in outputs.items():
          kept.setdefault(k, []).append(np.asarray(jax.device_get(v)))
    kept = {k: np.concatenate(v)[:keep_outputs] for k, v in kept.items()}
    return self._summarise(stage, totals, count), kept

  def _summarise(self, stage: Stage, t: dict, count: int) -> dict[str, float]:
    c = self.config
    pixels = c.data.height * c.data.width
    alpha, beta = stage.hp["alpha"], stage.hp.get("beta", 0.0)
    if stage.kind == "base":
      bpp = t["bits"] / count / pixels
      rmse = float(np.sqrt(t["depth_sq"] / max(t["depth_count"], 1)))
      rec = t["rec_rmse255"] / count
      return {"bpp_base": float(bpp), "depth_rmse": rmse,
              "psnr_from_base": float(t["psnr"] / count),
              "loss": float(alpha * bpp + rmse + beta * rec)}
    bpp_e = float(t["bits"] / count / pixels)
    bpp_b = float(t["bits_base"] / count / pixels)
    side = stage.hp["side_gate"]
    out = {"bpp_enhancement": bpp_e,
           "bpp_base": bpp_b if side > 0 else None}
    if c.task.enhancement == "reconstruction":
      out["psnr"] = float(t["psnr"] / count)
      distortion = float(t["rmse255"] / count)
    else:
      out["miou"] = float(losses.miou(jnp.asarray(t["confusion"]),
                                      c.task.ignore_index))
      distortion = float(t["seg_loss"] / count)
    out["loss"] = alpha * (side * bpp_b + bpp_e) + distortion
    return out

  def actual_rates(self, stage: Stage, variables: PyTree) -> dict:
    """Real file sizes: the first eval.actual_bits_images validation images
    compressed with the range coder (tcr_jax.codec.coding), in bits per
    full-resolution pixel; the base stream counts the container header."""
    from tcr_jax.codec import bitstream, coding
    n = min(self.config.eval.actual_bits_images, self.eval_images)
    if n <= 0 or jax.process_index() != 0:
      return {}
    images = self.val_data.batch(range(n))["image"]
    pixels = images.shape[1] * images.shape[2]
    total = 0.0
    for img in images:
      if stage.kind == "base":
        total += 8 * len(coding.compress_layers(self.base, variables, img))
        continue
      x = jnp.asarray(img[None])
      y_b = coding._layer_programs(self.base)[0](stage.frozen, x)
      em = coding.layer_entropy_model(self.base)
      _, info = coding.encode_latent(em, {"params": stage.frozen["params"]["em"]}, y_b)
      side = info["y_hat"] if stage.hp["side_gate"] > 0 else None
      y_e = coding._layer_programs(self.enh)[0](variables, x)
      streams, _ = coding.encode_latent(
          coding.layer_entropy_model(self.enh),
          {"params": variables["params"]["em"]}, y_e, side=side)
      total += 8 * len(bitstream.join_streams(streams))
    key = "bpp_actual_base" if stage.kind == "base" else "bpp_actual_enhancement"
    return {key: total / n / pixels, "actual_images": n}

  # ------------------------------------------------------------------ stages

  def run_stage(self, stage: Stage, writer_factory) -> tuple[PyTree, dict]:
    """Trains (or resumes, or skips) a stage; returns (variables, metrics)."""
    c = self.config
    stage_dir = os.path.join(self.workdir, "stages", stage.name)
    done_path = os.path.join(stage_dir, "done.json")
    # A fresh copy: the train step donates its state, and the initial
    # variables are shared by every stage of a kind.
    variables0 = jax.tree.map(np.array, self.init_variables(stage.kind))
    template = jax.device_put(variables0, self.replicated)
    final_dir = os.path.join(stage_dir, "final")
    if os.path.exists(done_path):
      with open(done_path) as f:
        done = json.load(f)
      variables = _restore(final_dir, template)
      log(f"[{stage.name}] finished earlier: {_fmt(done['metrics'])}")
      return variables, done["metrics"]

    tx = self.optimizer(stage.kind)
    params, batch_stats = _split_variables(variables0)
    state = {"params": params, "batch_stats": batch_stats,
             "opt_state": tx.init(params), "step": jnp.int32(0),
             "rng": jax.random.PRNGKey(_stage_seed(c.seed, stage.name)),
             "best_val": jnp.float32(np.inf)}
    state = jax.device_put(state, self.replicated)
    latest = _manager(os.path.join(stage_dir, "checkpoints"), async_=True)
    best = _manager(os.path.join(stage_dir, "best"), async_=False)
    if latest.latest_step() is not None:
      state = latest.restore(latest.latest_step(),
                             args=ocp.args.StandardRestore(state))
      log(f"[{stage.name}] resuming at step {int(state['step'])}")

    writer = writer_factory(os.path.join(stage_dir, "tensorboard"))
    from clu import periodic_actions
    progress = periodic_actions.ReportProgress(num_train_steps=stage.steps,
                                               writer=writer,
                                               every_steps=c.train.log_every)
    step_fn = self.train_step_fn(stage.kind)
    hp = jax.device_put(_hp_arrays(stage.hp), self.replicated)
    frozen = stage.frozen
    t0, s0 = time.perf_counter(), int(state["step"])
    for step in range(s0, stage.steps):
      batch = self.train_batch(stage, step)
      state, metrics = step_fn(state, batch, hp, frozen)
      s = step + 1
      progress(s)
      if s % c.train.log_every == 0 or s == stage.steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"[{stage.name}] loss is {m['loss']} at step {s}")
        writer.write_scalars(s, {f"train/{k}": v for k, v in m.items()})
        dt = time.perf_counter() - t0
        rate = (s - s0) * c.train.batch_size / max(dt, 1e-9)
        eta = dt / (s - s0) * (stage.steps - s)
        log(f"[{stage.name}] step {s}/{stage.steps} {_fmt(m)} "
            f"{rate:.1f} img/s eta {eta:.0f}s")
      if s % c.train.eval_every == 0 or s == stage.steps:
        variables = _variables(state)
        val, _ = self.evaluate(stage, variables, min(
            c.train.eval_images_during_training, self.eval_images))
        writer.write_scalars(s, {f"val/{k}": v for k, v in val.items()
                                 if v is not None})
        if val["loss"] < float(state["best_val"]):
          best.save(s, args=ocp.args.StandardSave(variables), force=True)
          best.wait_until_finished()
          state = dict(state, best_val=jax.device_put(
              jnp.float32(val["loss"]), self.replicated))
      if s % c.train.checkpoint_every == 0 or s == stage.steps:
        latest.save(s, args=ocp.args.StandardSave(state), force=True)
    latest.wait_until_finished()
    writer.flush()

    if best.latest_step() is not None:
      variables = best.restore(best.latest_step(),
                               args=ocp.args.StandardRestore(template))
    else:
      variables = _variables(state)
    _save(final_dir, variables)
    metrics, _ = self.evaluate(stage, variables, self.eval_images)
    metrics.update(self.actual_rates(stage, variables))
    _write_json(done_path, {"stage": stage.name, "hp": stage.hp,
                            "steps": stage.steps, "metrics": metrics})
    log(f"[{stage.name}] done: {_fmt(metrics)}")
    latest.close()
    best.close()
    return variables, metrics


# --------------------------------------------------------------------------
# Helpers.


_START = time.monotonic()


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[{time.monotonic() - _START:6.0f}s] {msg}", flush=True)


def _fmt(m: dict) -> str:
  return " ".join(f"{k} {v:.4g}" for k, v in m.items()
                  if isinstance(v, (int, float)) and v is not None)


def _variables(state: PyTree) -> PyTree:
  v = {"params": state["params"]}
  if state["batch_stats"]:
    v["batch_stats"] = state["batch_stats"]
  return v


def _manager(path: str, async_: bool) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=1,
                                      enable_async_checkpointing=async_,
                                      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(path), options=opts)


def _save(path: str, tree: PyTree) -> None:
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(path), tree, force=True)


def _restore(path: str, template: PyTree) -> PyTree:
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.abspath(path), template)


def _write_json(path: str, obj) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _load_head(variables: PyTree, key: str, path: str) -> PyTree:
  """Puts task-head variables from `tcr-jax import-torchvision` in place."""
  from tcr_jax.tasks import load_checkpoint
  _, head = load_checkpoint(path)
  out = {col: dict(tree) for col, tree in variables.items()}
  for col in ("params", "batch_stats"):
    if col in head and key in out.get(col, {}):
      want = jax.tree.map(jnp.shape, out[col][key])
      got = jax.tree.map(jnp.shape, head[col])
      if want != got:
        raise UserError(f"{path}: head variables do not fit the model "
                        "(different architecture or class count)")
      out[col][key] = head[col]
  return out


# --------------------------------------------------------------------------
# The experiment.


def stage_name(kind: str, method: str, alpha: float) -> str:
  return f"{kind}_{method}_alpha{alpha:g}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> list[dict]:
  """Runs the whole sweep; returns the records written to results.json."""
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  # What `tcr-jax compress/decompress --workdir` rebuild the models from.
  _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
  from clu import metric_writers  # imports TensorFlow: keep it here

  def writer_factory(logdir):
    return metric_writers.create_default_writer(
        logdir, just_logging=jax.process_index() > 0)

  c = config
  log(f"{c.experiment} ({c.variant}) on {jax.device_count()} "
      f"{jax.default_backend()} device(s), {jax.process_count()} process(es); "
      f"workdir {workdir}")
  records = []
  previews = []
  for alpha in c.sweep.alphas:
    alpha_e = alpha * c.sweep.enhancement_alpha_scale
    for method in c.sweep.methods:
      if method not in ("baseline", "proposal"):
        raise UserError(f"unknown method {method!r}; expected baseline or proposal")
      beta = 0.0 if method == "baseline" else c.sweep.beta
      bstage = Stage(stage_name("base", method, alpha), "base",
                     c.train.base_steps, {"alpha": alpha, "beta": beta})
      base_vars, bm = trainer.run_stage(bstage, writer_factory)
      records.append(_record(c, "base", method, alpha, beta, bm))
      estage = Stage(stage_name("enhancement", method, alpha), "enhancement",
                     c.train.enhancement_steps,
                     {"alpha": alpha_e, "side_gate": 1.0}, frozen=base_vars)
      enh_vars, em = trainer.run_stage(estage, writer_factory)
      records.append(_record(c, "enhancement", method, alpha, beta,
                             {**em, "depth_rmse": bm["depth_rmse"],
                              "psnr_from_base": bm["psnr_from_base"],
                              "bpp_actual_base": bm.get("bpp_actual_base")}))
      previews.append((alpha, method, bstage, base_vars, estage, enh_vars))
    if c.sweep.standalone:
      sstage = Stage(stage_name("enhancement", "standalone", alpha),
                     "enhancement", c.train.enhancement_steps,
                     {"alpha": alpha_e, "side_gate": 0.0}, frozen=base_vars)
      _, sm = trainer.run_stage(sstage, writer_factory)
      records.append(_record(c, "enhancement", "standalone", alpha, None, sm))

  _write_json(os.path.join(workdir, "results.json"), records)
  if jax.process_index() == 0:
    from tcr_jax import rd
    for alpha, method, bstage, bvars, estage, evars in previews:
      path = os.path.join(workdir, "previews", f"alpha{alpha:g}_{method}.png")
      if not os.path.exists(path):
        _, base_out = trainer.evaluate(bstage, bvars, c.eval.previews,
                                       keep_outputs=c.eval.previews)
        _, enh_out = trainer.evaluate(estage, evars, c.eval.previews,
                                      keep_outputs=c.eval.previews)
        rd.save_preview(path, base_out, enh_out, c.task.enhancement)
    report = rd.write_report(records, workdir, c.experiment)
    print(report, flush=True)
  return records


def _record(c, layer, method, alpha, beta, m) -> dict:
  enh_metric = "psnr" if c.task.enhancement == "reconstruction" else "miou"
  return {
      "experiment": c.experiment, "layer": layer, "method": method,
      "alpha": alpha, "beta": beta,
      "bpp_base": m.get("bpp_base"),
      "bpp_enhancement": m.get("bpp_enhancement") if layer == "enhancement" else None,
      "depth_rmse": m.get("depth_rmse"),
      "psnr_from_base": m.get("psnr_from_base"),
      enh_metric: m.get(enh_metric),
      "loss": m.get("loss"),
      # Real file sizes on the first `actual_images` validation images.
      "bpp_actual_base": m.get("bpp_actual_base"),
      "bpp_actual_enhancement": m.get("bpp_actual_enhancement"),
      "actual_images": m.get("actual_images"),
  }
