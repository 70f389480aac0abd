"""What a base task supplies: the interface of tcr_jax/bases/*.py.

A base task is the machine task the base layer's latent is coded for. Its
object, built from the experiment's config, owns everything that depends
on that task; the layers above (training, evaluation, the sweep, the coder,
the benchmark) call these methods and never ask which task it is:

  metrics, select_metrics   its metrics in results.json, and the ones that
                            may pick a base stage's result (train.base_select)
  check_config()            one-line UserErrors for its config fields
  dataset(split)            an indexable dataset in its batch layout
  base_model()              the base layer (DepthBase, DetectionBase, ...)
  enhancement_model()       the enhancement layer (models.Enhancement with
                            the task's enhancement_options())
  base_loss_fn, enhancement_loss_fn
                            L_b and L_e on its batches (tcr_jax/model/objectives.py)
  base_optimizer(tx)        tx wrapped for the base layer (frozen parts)
  init_variables(...)       a stage kind's initial variables
  evaluator(...)            its evaluation (tcr_jax/model/evaluate.py's Evaluator
                            or a subclass)
  initial_weights_note()    which task networks start from random weights
  save_preview(...)         a preview image of the evaluator's kept outputs
  trivial_references(...)   the trivial references of results.json
  coded_input(rgb), decoded_files(out)
                            `tcr-jax compress` / `decompress`: the image the
                            file codes, and the files a decoded one gives
  bench_batch(...)          a random batch for `tcr-jax bench train-step`
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from tcr_jax.model import models, objectives
from tcr_jax.tasks.checkpoint_io import load_into

PyTree = Any


class BaseTask:
  """The interface (module docstring); a task overrides what it has."""

  metrics: tuple[str, ...] = ()
  select_metrics: tuple[str, ...] = ("loss", "bpp_base", "psnr_from_base")
  # The trivial references' fields in results.json (none: no references).
  reference_names: tuple[str, ...] = ()

  def __init__(self, config):
    self.config = config

  def check_config(self) -> None:
    """One-line UserErrors for the task's config fields."""

  def dataset(self, split: str):
    raise NotImplementedError

  def base_model(self):
    raise NotImplementedError

  def enhancement_options(self) -> dict[str, Any]:
    """Fields of models.Enhancement this task sets."""
    return {}

  def enhancement_model(self):
    return models.enhancement_model(self.config, **self.enhancement_options())

  def base_loss_fn(self, model, variables, batch, rng, hp, frozen=None,
                   train: bool = True):
    """(loss to differentiate, (metrics, new batch statistics))."""
    raise NotImplementedError

  def enhancement_loss_fn(self, model, base, variables, batch, rng, hp,
                          frozen, train: bool = True):
    raise NotImplementedError

  def base_optimizer(self, tx):
    return tx

  def init_variables(self, base, enhancement, kind: str, key) -> PyTree:
    raise NotImplementedError

  def evaluator(self, base, enhancement, loader, mesh):
    raise NotImplementedError

  def initial_weights_note(self) -> str | None:
    return None

  def trivial_references(self, loader, eval_images: int) -> dict:
    """{name: value or None} for each of reference_names."""
    raise NotImplementedError

  def save_preview(self, path: str, base_out: dict, enh_out: dict) -> None:
    """Draws the outputs kept by the evaluator (previews/*.png)."""
    raise NotImplementedError

  def coded_input(self, rgb: np.ndarray) -> np.ndarray:
    """The image `tcr-jax compress` codes for this RGB input."""
    return rgb

  def decoded_files(self, out: dict) -> dict[str, bytes]:
    raise NotImplementedError

  def bench_batch(self, batch: int, height: int, width: int):
    """(a random training batch, the input that initialises the model)."""
    raise NotImplementedError


def png_bytes(array: np.ndarray) -> bytes:
  """A PNG file of an (H, W[, 3]) uint8 or uint16 array."""
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


# --------------------------------------------------------------------------
# What the tasks' pieces share.


def base_objective(terms, hp, state):
  """A base loss function's result from its batch terms (model/
  objectives.py): (what the step differentiates, (metrics with L_b as
  "loss", the new batch statistics))."""
  metrics = {"loss": objectives.base_loss(terms, hp["alpha"], hp["beta"]),
             **terms}
  loss = objectives.base_training_loss(terms, hp["alpha"], hp["beta"])
  return loss, (metrics, state.get("batch_stats", {}))


def enhancement_objective(terms, hp, state):
  """An enhancement loss function's result from its batch terms: (L_e,
  (metrics, the new batch statistics))."""
  loss = objectives.enhancement_loss(terms, hp["alpha"], hp["base_rate"])
  return loss, ({"loss": loss, **terms}, state.get("batch_stats", {}))


def load_pretrained(variables, init, slots) -> PyTree:
  """`variables` with the `tcr-jax import-torchvision` checkpoints that
  config.init names put in, in order: slots are (init field, where in the
  variables, architecture); an empty field loads nothing."""
  for field, where, arch in slots:
    if init.get(field):
      variables = load_into(variables, where, init[field], arch)
  return variables


# The segmentation enhancement's pretrained networks (config.init).
SEGMENTATION_WEIGHTS = (
    ("segmentation_backbone", ("head", "backbone"), "resnet50"),
    ("segmentation_head", ("head",), "deeplabv3_resnet50"))
