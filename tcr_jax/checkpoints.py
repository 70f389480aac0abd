"""Checkpoints: one orbax CheckpointManager per training stage.

    WORKDIR/stages/NAME/
      checkpoints/STEP/   items "variables" ({"params", "batch_stats"}) and
                          "train" (optimizer state, step, PRNG key); metrics
                          {"loss": validation loss, "select": the selection
                          metric, lower is better, "step"} when the step was
                          evaluated
      done.json           the stage's final metrics, written last
      tensorboard/

The manager keeps the latest checkpoint (for resumption) and the best one by
the selection metric (orbax's best_fn, best_mode "min"; the validation loss
unless config.train.*_select says otherwise), which is the stage's result: `load_variables` restores only its "variables" item, which is what
`tcr-jax compress/decompress` and the next stage read.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
# orbax's own default ArrayHandler is built with this store; no public name.
from orbax.checkpoint._src.metadata import array_metadata_store

from tcr_jax.errors import UserError

PyTree = Any
DONE = "done.json"
CHECKPOINTS = "checkpoints"

# orbax splits each replicated array among its replicas to save it
# (replica-parallel, its default off GPUs), one eager slice per replica and
# array: for this model's many small arrays on a host with several devices
# that took 30 s of a 80 s :smoke sweep. One replica writes each array
# instead, with orbax's default metadata store, so the checkpoints have the
# same files. (Quietly: orbax warns of any override.)
_verbosity = logging.get_verbosity()
logging.set_verbosity(logging.ERROR)
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=array_metadata_store.Store()),
    override=True)
logging.set_verbosity(_verbosity)


def manager(stage_dir: str, *, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The stage's manager: latest and best (lowest "select" metric) kept.

  read_only: open an existing directory without creating or cleaning it.
  """
  # Lowest "select" first; among equal values the earliest step, so that a
  # stage that stops improving keeps its first best checkpoint.
  best = lambda metrics: (metrics["select"], metrics["step"])
  options = ocp.CheckpointManagerOptions(
      best_fn=best, best_mode="min",
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=1),
          policies.BestN(get_metric_fn=best, reverse=True, n=1,
                         keep_checkpoints_without_metrics=False)]),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only, create=not read_only)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(stage_dir, CHECKPOINTS)), options=options,
      item_names=("variables", "train"))


def save(mngr: ocp.CheckpointManager, step: int, variables: PyTree,
         train: PyTree, metrics: dict | None = None) -> None:
  """metrics (evaluated steps only): {"loss", "select"}; the step is added."""
  if metrics is not None:
    metrics = {**metrics, "step": step}
  mngr.save(step, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(variables),
      train=ocp.args.StandardSave(train)), metrics=metrics, force=True)


def restore(mngr: ocp.CheckpointManager, step: int, variables: PyTree,
            train: PyTree) -> tuple[PyTree, PyTree]:
  """(variables, train) of `step`, shaped and sharded like the templates."""
  out = mngr.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(variables),
      train=ocp.args.StandardRestore(train)))
  return out["variables"], out["train"]


def result_step(mngr: ocp.CheckpointManager) -> int | None:
  """The best evaluated step, else the latest (None: nothing saved)."""
  step = mngr.best_step()
  return step if step is not None else mngr.latest_step()


def restore_variables(mngr: ocp.CheckpointManager, template: PyTree,
                      step: int | None = None) -> PyTree:
  """Only the "variables" item of `step` (default: the result step)."""
  step = result_step(mngr) if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(template)))["variables"]


def load_variables(stage_dir: str, template: PyTree) -> PyTree:
  """The result of a finished stage, read-only (compress, decompress, and
  the checkpoints of `tcr-jax import-torchvision`)."""
  if not os.path.isdir(os.path.join(stage_dir, CHECKPOINTS)):
    raise FileNotFoundError(f"no checkpoints in {stage_dir}")
  with manager(stage_dir, async_save=False, read_only=True) as mngr:
    if result_step(mngr) is None:
      raise FileNotFoundError(f"no checkpoint in {stage_dir}")
    return restore_variables(mngr, template)


def save_variables(directory: str, variables: PyTree, step: int = 0) -> None:
  """Variables alone, as a one-checkpoint manager directory (what
  `tcr-jax import-torchvision` writes; read back with load_variables)."""
  with manager(directory, async_save=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables)), force=True)


def workdir_config(workdir: str):
  """The config a training workdir was trained with (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{workdir} is not a training workdir (no config.json); "
                    "train with python -m tcr_jax.main first")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def finished_stages(workdir: str) -> list[str]:
  """The names of a workdir's finished stages (those with done.json)."""
  done = glob.glob(os.path.join(workdir, "stages", "*", DONE))
  return sorted(os.path.basename(os.path.dirname(d)) for d in done)


def read_done(stage_dir: str) -> dict | None:
  return read_json(os.path.join(stage_dir, DONE))


def read_json(path: str, default=None):
  """The JSON file at `path`, or `default` where there is none."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  """Atomically, by process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
  """With several processes, each waits here until all have arrived: the
  coordination service's barrier (orbax's multihost), with a long timeout,
  not a collective. Called where one process may arrive much later than
  another (each compiled its own programs, coded files, drew a preview):
  gloo gives up on a late peer after 30 s, which a busy machine exceeds.
  `name` must be new in the job."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(
        f"tcr_jax: {name}", timeout=timeout_s,
        processes=set(range(jax.process_count())))
