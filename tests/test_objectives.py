"""The paper's mechanism: what the reconstruction reward and the side
information may and may not reach (tcr_jax/model/objectives.py, models.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax.bases import depth
from tcr_jax.model import models, objectives

KW = dict(latent_channels=8, widths=(4, 6, 8), analysis_blocks=1,
          task_blocks=1, recon_blocks=1)
H, W = 32, 64


@pytest.fixture(scope="module")
def base(random_variables):
  model = models.DepthBase(hyper_channels=4, disparity_scale=4.0, **KW)
  x = jax.random.uniform(jax.random.key(0), (2, H, W, 3))
  batch = {"image": x,
           "disparity": jax.random.uniform(jax.random.key(1), (2, H, W)) * 4,
           "valid": jnp.ones((2, H, W), bool)}
  return model, random_variables(model, x[:1]), batch


@pytest.fixture(scope="module")
def grads(base):
  """Gradients w.r.t. the base's params of the reconstruction term, of the
  base's training loss (alpha 0.05) and of alpha * R + D, for beta 0
  (baseline) and 0.01 (proposal); one compiled program for all, whose one
  backward pass carries the three terms (jacrev: a vmap over the vjp, a
  third of the program that three separate gradients compile). Run once:
  XLA's cheapest code generation (opt level 0) compiles it sooner."""
  model, variables, batch = base
  which = ("rec", "train", "task")

  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def all_grads(params, beta):
    def f(params):
      o, _ = model.apply({**variables, "params": params}, batch["image"],
                         train=True, mutable=["batch_stats"],
                         rec_gate=objectives.reconstruction_gate(beta))
      t = objectives.base_terms(o, batch)
      return jnp.stack([t["rec_rmse255"],
                        objectives.base_training_loss(t, 0.05, beta),
                        0.05 * t["bpp"] + t["depth_rmse"]])
    jac = jax.jacrev(f)(params)
    return {w: jax.tree.map(lambda g, i=i: g[i], jac) for i, w in enumerate(which)}

  return {beta: all_grads(variables["params"], jnp.float32(beta))
          for beta in (0.0, 0.01)}


def _norm(tree) -> float:
  return float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(tree)))


CODER = ("down", "g_a", "em")  # what produces and models the latent Y_b


def test_baseline_reconstruction_term_never_reaches_the_latent(grads):
  g = {beta: grads[beta]["rec"] for beta in grads}
  for name in CODER:
    assert _norm(g[0.0][name]) == 0.0, name  # the baseline's gate
  for name in ("down", "g_a"):
    assert _norm(g[0.01][name]) > 0.0, name  # the proposal's
  # y_hat = round(y) does not depend on the entropy model's parameters: the
  # reward shapes Y_b, which the rate term then makes the model fit
  assert _norm(g[0.01]["em"]) == 0.0
  # the decoder itself trains in both
  assert _norm(g[0.0]["g_s_rec"]) > 0 and _norm(g[0.01]["g_s_rec"]) > 0
  # and the reward does not reach the task path
  assert _norm(g[0.01]["head"]) == 0.0


def test_baseline_latent_trains_on_rate_and_task_alone(grads):
  """The baseline's training loss (with the decoder's weight-1 term) moves
  g_a and the entropy model exactly as alpha * R + D does."""
  full, task = grads[0.0]["train"], grads[0.0]["task"]
  for name in CODER:
    for a, b in zip(jax.tree.leaves(full[name]), jax.tree.leaves(task[name])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_losses_are_the_papers_equations():
  terms = {"bpp": 0.5, "depth_rmse": 2.0, "rec_rmse255": 30.0}
  assert float(objectives.base_loss(terms, 0.1, 0.01)) == pytest.approx(
      0.1 * 0.5 + 2.0 + 0.01 * 30.0)
  # the baseline's objective has no reconstruction term; its training loss
  # keeps the decoder learning (weight 1)
  assert float(objectives.base_loss(terms, 0.1, 0.0)) == pytest.approx(2.05)
  assert float(objectives.base_training_loss(terms, 0.1, 0.0)) == pytest.approx(32.05)
  e = {"bpp_base": 0.5, "bpp_enhancement": 0.25, "distortion": 10.0}
  assert float(objectives.enhancement_loss(e, 2.0, 1.0)) == pytest.approx(11.5)
  assert float(objectives.enhancement_loss(e, 2.0, 0.0)) == pytest.approx(10.5)


@pytest.fixture(scope="module")
def enhancement(base, random_variables):
  bmodel, _, batch = base
  x = batch["image"]
  # two base layers whose latents differ
  frozen = [random_variables(bmodel, x[:1], seed=s) for s in (1, 2)]
  y = [bmodel.apply(v, x, method="encode")[0] for v in frozen]
  assert not np.array_equal(y[0], y[1])
  emodel = models.Enhancement(side_channels=8, **KW)
  evars = random_variables(emodel, x[:1], y[0][:1], seed=3)
  config = type("C", (), {})()
  config.task = type("T", (), dict(enhancement="reconstruction", num_classes=0,
                                   ignore_index=-1, aux_weight=0.5,
                                   enhancement_rate_pixels="full"))()
  loss_fn = functools.partial(depth.Task(config).enhancement_loss_fn, emodel, bmodel)
  return loss_fn, evars, frozen, batch


def test_standalone_enhancement_sees_nothing_of_the_base(enhancement):
  loss_fn, evars, frozen, batch = enhancement

  def outputs(side_gate, base_vars):
    hp = {"alpha": jnp.float32(1.0), "side_gate": jnp.float32(side_gate),
          "base_rate": jnp.float32(side_gate)}
    _, (metrics, _) = loss_fn(evars, batch, jax.random.key(0), hp, base_vars)
    return metrics

  alone = [outputs(0.0, v) for v in frozen]
  conditional = [outputs(1.0, v) for v in frozen]
  # the standalone layer's rate and output do not depend on the base latent
  for k in ("bpp_enhancement", "distortion"):
    assert float(alone[0][k]) == float(alone[1][k]), k
  # the conditional layer's rate does
  assert float(conditional[0]["bpp_enhancement"]) != float(
      conditional[1]["bpp_enhancement"])
