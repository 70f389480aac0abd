"""The `:authors` protocol and the choices that separate it from ours."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax import configs_lib
from tcr_jax.codec import entropy
from tcr_jax.errors import UserError
from tcr_jax.tasks import checkpoint_io
from tcr_jax.training import train

try:  # before JAX runs anything: a late torchvision import can crash
  import torch
  import torchvision
except ImportError:
  torch = torchvision = None


@pytest.mark.parametrize("experiment", ["depth_recon", "depth_seg"])
def test_authors_configs_hold_the_authors_values(configs, experiment):
  c = configs.load(experiment, "authors")
  recon = experiment == "depth_recon"
  assert c.variant == "authors"
  assert c.entropy_model == "context" and c.enhancement_context == "serial"
  assert c.sweep.beta == 0.1
  assert c.task.aux_weight == 1.0
  assert c.task.enhancement_rate_pixels == ("half" if recon else "full")
  assert c.sweep.standalone_mode == "refit"
  assert c.model.likelihood_bound == "lower_bound"
  assert (c.train.learning_rate, c.train.batch_size) == (1e-4, 10)
  assert (c.train.base_grad_clip, c.train.enhancement_grad_clip) == (0.0, 1.0)
  epoch = 298  # ceil(2975 Cityscapes training images / batch 10)
  assert c.train.eval_every == epoch and c.train.base_steps == 1000 * epoch
  assert (c.train.base_select, c.train.base_patience) == ("loss", 200)
  assert (c.train.enhancement_select, c.train.enhancement_patience) == (
      ("bpp_enhancement", 5) if recon else ("miou", 50))
  configs_lib.validate(c)
  # the no-variant config keeps the poster's beta and the hyperprior
  paper = configs.load(experiment)
  assert paper.sweep.beta == 0.01 and paper.entropy_model == "hyperprior"
  assert paper.sweep.standalone_mode == "scratch"
  assert paper.train.base_patience == paper.train.enhancement_patience == 0


def test_bad_choices_are_one_line_errors(configs):
  for key, value in (("sweep.standalone_mode", "warm"),
                     ("task.enhancement_rate_pixels", "quarter"),
                     ("train.enhancement_select", "depth_rmse"),
                     ("model.likelihood_bound", "soft")):
    c = configs.smoke(**{key: value})
    with pytest.raises(UserError, match=key.split(".")[-1]) as e:
      configs_lib.validate(c)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bound,passes", [("clamp", False), ("lower_bound", True)])
def test_likelihood_bound_gradient(bound, passes):
  """Below 1e-9, the clamp stops the rate's gradient; the authors' bound
  lets through the part that raises the likelihood (a wider scale here)."""
  residual = jnp.float32(7.0)  # p ~ 4e-11: below the bound, not underflowing
  rate = lambda s: -jnp.log2(entropy.gaussian_likelihood(residual, s, bound))
  assert float(entropy.gaussian_likelihood(residual, 1.0, bound)) == np.float32(1e-9)
  g = float(jax.grad(rate)(jnp.float32(1.0)))
  assert (g < 0) if passes else (g == 0.0)
  # above the bound both are the same function
  near = jnp.float32(2.0)
  g_near = lambda b: float(jax.grad(lambda s: -jnp.log2(
      entropy.gaussian_likelihood(near, s, b)))(jnp.float32(1.0)))
  assert g_near(bound) == g_near("clamp") != 0.0


class _Writer:
  def write_scalars(self, step, scalars):
    pass

  def flush(self):
    pass


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, configs):
  config = configs.smoke(**{"data.hflip": False, "data.color_jitter": 0.0})
  workdir = str(tmp_path_factory.mktemp("authors"))
  return train.Experiment(config, workdir, devices=jax.devices()[:1])


def test_refit_standalone_changes_only_the_entropy_model(experiment):
  exp = experiment
  base = exp.init_variables("base")
  start = jax.tree.map(lambda a: a + 0.01, exp.init_variables("enhancement"))
  stage = train.Stage("refit", "enhancement", 3,
                      {"alpha": 1.0, "side_gate": 0.0, "base_rate": 1.0},
                      frozen=base, init=start, trainable="entropy_model")
  variables, metrics = train.run_stage(exp, stage, lambda logdir: _Writer())
  changed = {k: not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(variables["params"][k]), jax.tree.leaves(start["params"][k])))
      for k in start["params"]}
  assert changed.pop("em") and not any(changed.values()), changed
  # its rate includes the base's, as the conditional layer's does
  assert metrics["bpp_base"] > 0 and metrics["bpp_enhancement"] > 0


def test_early_stopping_keeps_the_first_best_and_stops(experiment, monkeypatch):
  """Validation losses 5, 4, 4, 4.5, ...: the first 4 (step 2) is the result
  and, with patience 2, training stops at step 4 of 10."""
  exp = experiment
  losses = iter([5.0, 4.0, 4.0, 4.5, 4.2, 4.1, 3.0, 3.0, 3.0, 3.0])
  monkeypatch.setattr(exp.evaluator, "evaluate", lambda stage, v, n, **kw: (
      {"loss": next(losses, 0.0), "bpp_base": 0.1, "depth_rmse": 1.0,
       "psnr_from_base": 20.0}, {}))
  monkeypatch.setattr(exp.evaluator, "actual_rates", lambda stage, v: {})
  with exp.config.unlocked():
    exp.config.train.base_patience = 2
    exp.config.train.eval_every = 1
  try:
    stage = train.Stage("stopping", "base", 10, {"alpha": 0.05, "beta": 0.01})
    train.run_stage(exp, stage, lambda logdir: _Writer())
  finally:
    with exp.config.unlocked():
      exp.config.train.base_patience = 0
      exp.config.train.eval_every = 2
  with open(os.path.join(exp.workdir, "stages", "stopping", "done.json")) as f:
    done = json.load(f)
  assert done["steps"] == 10 and done["trained_steps"] == 4
  assert done["result_step"] == 2


@pytest.mark.slow
@pytest.mark.parity
def test_imagenet_backbone_starts_the_depth_head(experiment, tmp_path, capsys):
  """`tcr-jax import-torchvision --arch mobilenet_v3_large` of torchvision's
  classifier, then config.init.depth_backbone: the head's backbone holds it."""
  if torchvision is None:
    pytest.skip("needs torch and torchvision (the parity extra)")
  from tcr_jax import cli
  net = torchvision.models.mobilenet_v3_large(weights=None)
  torch.save(net.state_dict(), tmp_path / "mnv3.pth")
  assert cli.main(["import-torchvision", "--arch", "mobilenet_v3_large",
                   "--state-dict", str(tmp_path / "mnv3.pth"),
                   "--output", str(tmp_path / "mnv3")]) == 0
  exp = experiment
  with exp.config.unlocked():
    exp.config.init.depth_backbone = str(tmp_path / "mnv3")
  try:
    v = exp._init_variables("base")
  finally:
    with exp.config.unlocked():
      exp.config.init.depth_backbone = ""
  first = np.asarray(v["params"]["head"]["backbone"]["stem"]["conv"]["kernel"])
  want = net.features[0][0].weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(first, want)
  # a checkpoint of another architecture is refused in one line
  with exp.config.unlocked():
    exp.config.init.depth_backbone = str(tmp_path / "mnv3")
  try:
    with pytest.raises(UserError, match="resnet50"):
      checkpoint_io.load_into(v, ("head", "backbone"), str(tmp_path / "mnv3"),
                              "resnet50")
  finally:
    with exp.config.unlocked():
      exp.config.init.depth_backbone = ""
  assert exp.task.initial_weights_note().startswith("note: the depth head")
