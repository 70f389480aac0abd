"""Training one stage: train state, the jitted step, the loop.

A stage is one model of the sweep (tcr_jax/training/sweep.py): a base layer, or an
enhancement layer on a frozen base. `Experiment` holds what every stage of a
sweep shares (the mesh, the data, the two models, the compiled steps); the
base task's object (tcr_jax/bases/) supplies the data, the models, the loss
functions, the initial variables and the evaluator;
`run_stage` trains a stage, or resumes it, or skips it when it is finished:

  * the train state is flax's TrainState plus batch statistics and a PRNG
    key; params, statistics and optimizer state are replicated over the mesh,
    batches sharded along "data", and the state is donated to the step;
  * alpha, beta, side_gate and base_rate are traced inputs (`Stage.hp`),
    so every alpha and method reuses one compiled step per layer kind;
  * one orbax CheckpointManager per stage (tcr_jax/checkpoints.py) keeps the
    latest checkpoint (resumption) and the best by the validation metric
    config.train.*_select (the stage's result); with *_patience > 0 a stage
    stops after that many evaluations without improvement; done.json marks
    a finished stage;
  * the data order and the random numbers are functions of (seed, stage,
    step), so a resumed stage ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from tcr_jax import bases, checkpoints
from tcr_jax.data import loader as loader_lib
from tcr_jax.data import sampler
from tcr_jax.errors import UserError
from tcr_jax.training import sharding

PyTree = Any


TRAINABLE = ("all", "entropy_model")


@dataclasses.dataclass
class Stage:
  """One model to train: what it is, its hyper-parameters and its inputs."""
  name: str
  kind: str              # "base" or "enhancement"
  steps: int
  # alpha; beta (base); side_gate (1: the base latent is the side
  # information, 0: zeros) and base_rate (1: R_b counts in L_e) (enhancement)
  hp: dict[str, float]
  frozen: PyTree = None  # the base variables, for an enhancement
  init: PyTree = None    # variables to start from (None: the kind's init)
  trainable: str = "all"  # or "entropy_model": the rest stays frozen


class TrainState(train_state.TrainState):
  batch_stats: PyTree
  rng: jax.Array

  @property
  def variables(self) -> PyTree:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def split(self) -> tuple[PyTree, PyTree]:
    """(variables, the rest) as the checkpoint's two items."""
    return self.variables, {"opt_state": self.opt_state, "step": self.step,
                            "rng": self.rng}

  def join(self, variables: PyTree, rest: PyTree) -> "TrainState":
    return self.replace(params=variables["params"],
                        batch_stats=variables["batch_stats"], **rest)


def _with_batch_stats(variables: PyTree) -> PyTree:
  return {"params": variables["params"],
          "batch_stats": variables.get("batch_stats", {})}


SCHEDULES = ("constant", "cosine")


def learning_rate_scale(step, steps, schedule: str, warmup: int = 0) -> jax.Array:
  """The factor on the configured learning rate at `step` of `steps`:
  1 ("constant"), or a cosine decay from 1 to 0 over the stage ("cosine");
  with `warmup` > 0, times a linear ramp from 1/warmup to 1 over the stage's
  first `warmup` steps (a fresh Adam's first updates are as large as the
  learning rate on every parameter)."""
  ramp = (jnp.minimum(1.0, (step + 1.0) / warmup) if warmup > 0
          else jnp.float32(1.0))
  if schedule == "constant":
    return ramp
  progress = jnp.clip(step / jnp.maximum(steps, 1.0), 0.0, 1.0)
  return ramp * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def train_step(state: TrainState, batch, hp, frozen, *, loss_fn: Callable,
               schedule: str = "constant", warmup: int = 0
               ) -> tuple[TrainState, dict]:
  """One update; hp["steps"] (the stage's length) drives the schedule,
  hp["learning_rate"] is the step size (a value, not a constant of the
  program: a new learning rate compiles nothing) and hp["lr_scale"]
  (default 1) scales it. state.tx is `optimizer`'s unit-step Adam."""
  rng = jax.random.fold_in(state.rng, state.step)

  def differentiate(params):
    return loss_fn({"params": params, "batch_stats": state.batch_stats},
                   batch, rng, hp, frozen)

  (_, (metrics, batch_stats)), grads = jax.value_and_grad(
      differentiate, has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  scale = (learning_rate_scale(state.step, hp.get("steps", 1.0), schedule, warmup)
           * hp["learning_rate"] * hp.get("lr_scale", 1.0))
  updates = jax.tree.map(lambda u: u * scale, updates)
  state = state.replace(step=state.step + 1,
                        params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state, batch_stats=batch_stats)
  return state, metrics


def step_hp(stage: Stage, learning_rate: float) -> dict:
  """The hyperparameters train_step gets for `stage`: its hp, its length
  ("steps"), the learning rate, and lr_scale always (1 unless a fine-tune
  sets it), so every stage of a kind has the same structure and one
  compiled step serves them all, whatever their learning rates."""
  return {k: jnp.float32(v) for k, v in
          {"lr_scale": 1.0, **stage.hp, "steps": stage.steps,
           "learning_rate": learning_rate}.items()}


def optimizer(config, kind: str, trainable: str = "all", task=None
              ) -> optax.GradientTransformation:
  """Adam with a unit step (train_step multiplies the update by
  hp["learning_rate"]: config.train.learning_rate reaches the compiled step
  as a value), with the kind's gradient clipping and, for the base layer,
  the base task's frozen parts (task.base_optimizer); trainable=
  "entropy_model" leaves every parameter outside the entropy model ("em")
  unchanged."""
  t = config.train
  clip = t.base_grad_clip if kind == "base" else t.enhancement_grad_clip
  adam = optax.adam(1.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam
  if kind == "base":
    tx = (task or bases.for_config(config)).base_optimizer(tx)
  if trainable == "all":
    return tx
  labels = lambda params: {k: "train" if k == "em" else "freeze" for k in params}
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               labels)


# --------------------------------------------------------------------------
# What the stages of a sweep share.


class Experiment:
  """The mesh, the data, the two layers and their compiled steps."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               devices=None):
    self.config = config
    self.workdir = workdir
    self.task = bases.for_config(config)
    self.mesh = sharding.data_mesh(devices)
    self.loader = loader_lib.Loader(config, self.mesh,  # data errors first
                                    self.task.dataset)
    n_dev = self.mesh.size
    for what, b in (("train.batch_size", config.train.batch_size),
                    ("eval.batch_size", config.eval.batch_size)):
      if b % n_dev:
        raise UserError(f"{what}={b} is not divisible by the {n_dev} devices")
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.eval_images = min(config.data.eval_images, len(self.loader.val_data),
                           len(self.loader.report_data))
    self.base = self.task.base_model()
    self.enh = self.task.enhancement_model()
    self.evaluator = self.task.evaluator(self.base, self.enh, self.loader,
                                         self.mesh)
    self._steps: dict[tuple, Callable] = {}
    self._initial: dict[str, PyTree] = {}
    # One optimizer object per (kind, trainable): it is part of the state's
    # static structure, so a new one per stage would recompile the step.
    self.tx = {(kind, tr): optimizer(config, kind, tr, self.task)
               for kind in ("base", "enhancement") for tr in TRAINABLE}
    # Compiled: eagerly, Adam's zeros are one dispatch per leaf (0.7 s a
    # stage on two CPU cores).
    self._tx_init = {key: jax.jit(tx.init) for key, tx in self.tx.items()}

  def loss_fn(self, kind: str, train: bool = True) -> Callable:
    """(variables, batch, rng, hp, frozen) -> (loss, (metrics, stats))."""
    if kind == "base":
      return functools.partial(self.task.base_loss_fn, self.base, train=train)
    return functools.partial(self.task.enhancement_loss_fn, self.enh,
                             self.base, train=train)

  def train_step(self, kind: str, trainable: str = "all") -> Callable:
    if (kind, trainable) not in self._steps:
      r, b = self.replicated, self.batch_sharding
      step = functools.partial(train_step, loss_fn=self.loss_fn(kind),
                               schedule=self.config.train.lr_schedule,
                               warmup=self.config.train.warmup_steps)
      self._steps[kind, trainable] = jax.jit(
          step, in_shardings=(r, b, r, r), out_shardings=(r, r),
          donate_argnums=0)
    return self._steps[kind, trainable]

  def init_variables(self, kind: str) -> PyTree:
    """Initial variables of a stage kind (the same for every stage of it)."""
    if kind not in self._initial:
      self._initial[kind] = _with_batch_stats(self._init_variables(kind))
    return self._initial[kind]

  def _init_variables(self, kind: str) -> PyTree:
    # The rbg generator compiles initialisers ~5x faster than threefry on
    # CPU (20 s -> 4 s for g_a); the train steps keep threefry.
    key = jax.random.key(sampler.stage_seed(self.config.seed, kind), impl="rbg")
    return self.task.init_variables(self.base, self.enh, kind, key)

  def create_train_state(self, stage: Stage) -> TrainState:
    # A fresh copy: the step donates its state, and the initial variables
    # are shared by every stage of a kind.
    start = stage.init if stage.init is not None else self.init_variables(stage.kind)
    variables = jax.tree.map(np.array, _with_batch_stats(start))
    model = self.base if stage.kind == "base" else self.enh
    tx = self.tx[stage.kind, stage.trainable]
    state = TrainState(
        step=jnp.int32(0), apply_fn=model.apply, params=variables["params"],
        tx=tx, opt_state=self._tx_init[stage.kind, stage.trainable](
            variables["params"]),
        batch_stats=variables["batch_stats"],
        rng=jax.random.PRNGKey(sampler.stage_seed(self.config.seed, stage.name)))
    return jax.device_put(state, self.replicated)


# --------------------------------------------------------------------------
# The stage loop.


def run_stage(exp: Experiment, stage: Stage, writer_factory
              ) -> tuple[PyTree, dict]:
  """Trains (or resumes, or skips) a stage; returns (variables, metrics)."""
  stage_dir = os.path.join(exp.workdir, "stages", stage.name)
  state = exp.create_train_state(stage)
  # Each process compiled its own initialiser; the collectives start here.
  checkpoints.wait_for_all_processes(f"{stage.name} start")
  variables_template, train_template = state.split()
  done = checkpoints.read_done(stage_dir)
  mngr = checkpoints.manager(stage_dir, async_save=done is None)
  with mngr:
    if done is not None:
      if done.get("split", exp.loader.report_split) != exp.loader.report_split:
        raise UserError(f"stage {stage.name} was measured on the {done['split']} "
                        f"images, this config's eval.split is "
                        f"{exp.loader.report_split!r}; use another workdir")
      log(f"[{stage.name}] finished earlier: {_fmt(done['metrics'])}")
      return (checkpoints.restore_variables(mngr, variables_template),
              done["metrics"])
    if mngr.latest_step() is not None:
      state = state.join(*checkpoints.restore(mngr, mngr.latest_step(),
                                              variables_template, train_template))
      log(f"[{stage.name}] resuming at step {int(state.step)}")
    last = _train(exp, stage, state, mngr, writer_factory(
        os.path.join(stage_dir, "tensorboard")))
    mngr.wait_until_finished()
    result = checkpoints.result_step(mngr)
    variables = checkpoints.restore_variables(mngr, variables_template)
  checkpoints.wait_for_all_processes(f"{stage.name} evaluate")
  metrics, _ = exp.evaluator.evaluate(stage, variables, exp.eval_images,
                                      split=exp.loader.report_split)
  metrics.update(exp.evaluator.actual_rates(stage, variables))
  checkpoints.write_json(os.path.join(stage_dir, checkpoints.DONE),
                         {"stage": stage.name, "hp": stage.hp,
                          "steps": stage.steps, "trained_steps": last,
                          "result_step": result, "split": exp.loader.report_split,
                          "metrics": metrics})
  log(f"[{stage.name}] done: {_fmt(metrics)}")
  return variables, metrics


HIGHER_IS_BETTER = ("psnr", "psnr_from_base", "miou", "map", "map50")


def selection_value(val: dict, metric: str) -> float:
  """The validation metric that picks a stage's result, lower is better."""
  return -val[metric] if metric in HIGHER_IS_BETTER else val[metric]


def _train(exp: Experiment, stage: Stage, state: TrainState, mngr, writer
           ) -> int:
  """The loop; returns the last trained step (early stopping may end it
  before stage.steps)."""
  from clu import periodic_actions
  t = exp.config.train
  base = stage.kind == "base"
  select = t.base_select if base else t.enhancement_select
  patience = t.base_patience if base else t.enhancement_patience

  def stopped(step: int) -> bool:
    """No better `select` for `patience` evaluations (resumable: read off
    the manager's best step)."""
    best = mngr.best_step()
    return (patience > 0 and best is not None
            and step - best >= patience * t.eval_every)

  progress = periodic_actions.ReportProgress(num_train_steps=stage.steps,
                                             writer=writer,
                                             every_steps=t.log_every)
  step_fn = exp.train_step(stage.kind, stage.trainable)
  hp = jax.device_put(step_hp(stage, t.learning_rate), exp.replicated)
  eval_count = min(t.eval_images_during_training, exp.eval_images)
  t0, s0 = time.perf_counter(), int(state.step)
  if stopped(s0):
    return s0
  s = s0
  batches = exp.loader.train_batches(stage.name, s0, stage.steps)
  for step, batch in zip(range(s0, stage.steps), batches):
    state, metrics = step_fn(state, batch, hp, stage.frozen)
    s = step + 1
    last = s == stage.steps
    progress(s)
    if s % t.log_every == 0 or last:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(m["loss"]):
        raise FloatingPointError(f"[{stage.name}] loss is {m['loss']} at step {s}")
      writer.write_scalars(s, {f"train/{k}": v for k, v in m.items()})
      dt = time.perf_counter() - t0
      rate = (s - s0) * t.batch_size / max(dt, 1e-9)
      eta = dt / (s - s0) * (stage.steps - s)
      log(f"[{stage.name}] step {s}/{stage.steps} {_fmt(m)} "
          f"{rate:.1f} img/s eta {eta:.0f}s")
    val = None
    if s % t.eval_every == 0 or last:
      val, _ = exp.evaluator.evaluate(stage, state.variables, eval_count)
      writer.write_scalars(s, {f"val/{k}": v for k, v in val.items()
                               if v is not None})
    if val is not None or s % t.checkpoint_every == 0:
      checkpoints.save(mngr, s, *state.split(), metrics=None if val is None else
                       {"loss": val["loss"], "select": selection_value(val, select)})
    if val is not None and stopped(s):
      log(f"[{stage.name}] early stop at step {s}: no better validation "
          f"{select} in {patience} evaluations (best: step {mngr.best_step()})")
      break
  batches.close()  # an early stop leaves batches made ahead: drop them
  writer.flush()
  return s


# --------------------------------------------------------------------------
# Logging.

_START = time.monotonic()


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[{time.monotonic() - _START:6.0f}s] {msg}", flush=True)


def _fmt(m: dict) -> str:
  return " ".join(f"{k} {v:.4g}" for k, v in m.items()
                  if isinstance(v, (int, float)) and v is not None)
