"""What the :synthetic demo relies on: the trivial references, the shared
pre-trained start of the base models, the learning-rate schedule, the depth
head's batch-norm momentum, and the report that sets references next to the
models."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax import bases, checkpoints, configs_lib
from tcr_jax.data import labels as label_ids
from tcr_jax.errors import UserError
from tcr_jax.reporting import rd, references
from tcr_jax.training import sweep, train


class _Scenes:
  """A dataset of `n` fixed scenes: disparity = row * slope (+ noise)."""

  def __init__(self, n, seed, noise=0.0, h=4, w=6, object_shift=0.0):
    rng = np.random.default_rng(seed)
    rows = np.arange(h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
    self.disparity = rows[None] * 2.0 + noise * rng.normal(size=(n, h, w)).astype(np.float32)
    # A car in the lower right corner, `object_shift` px nearer than the road.
    self.labels = np.zeros((n, h, w), np.int32)
    self.labels[:, 2:, 3:] = label_ids.CAR
    self.disparity[:, 2:, 3:] += object_shift
    self.valid = np.ones((n, h, w), bool)
    self.valid[:, 0, 0] = False  # an invalid pixel never counts
    self.disparity[:, 0, 0] = 1e6
    self.image = rng.uniform(size=(n, h, w, 3)).astype(np.float32)

  def __len__(self):
    return len(self.image)

  def batch(self, indices):
    i = np.asarray(list(indices))
    return {"image": self.image[i], "disparity": self.disparity[i],
            "valid": self.valid[i], "labels": self.labels[i]}


def test_references_on_scenes_that_follow_the_row():
  train_data, val_data = _Scenes(10, 0), _Scenes(5, 1)
  refs = references.trivial_references(train_data, val_data, 10, 5, batch=3)
  # Disparity is exactly 2 * row: the per-pixel mean map is exact, a constant
  # is off by the rows' spread (valid pixels only: the 1e6 ones are ignored).
  assert refs["mean_disparity_rmse"] == pytest.approx(0.0, abs=1e-6)
  d = val_data.disparity[val_data.valid]
  constant = train_data.disparity[train_data.valid].mean()
  assert refs["constant_disparity_rmse"] == pytest.approx(
      float(np.sqrt(np.mean((d - constant) ** 2))), rel=1e-6)
  mean_image = train_data.image.mean(0)
  mse = ((val_data.image - mean_image) ** 2).mean(axis=(1, 2, 3))
  assert refs["mean_image_psnr"] == pytest.approx(float(np.mean(-10 * np.log10(mse))), rel=1e-6)


def test_the_object_reference_counts_only_the_pixels_of_objects():
  # The validation scenes' car is 3 px nearer than the training scenes': the
  # mean map is off by exactly 3 px on its 6 pixels (of 23 valid), and on
  # nothing else.
  train_data, val_data = _Scenes(10, 0), _Scenes(5, 1, object_shift=3.0)
  refs = references.trivial_references(train_data, val_data, 10, 5, batch=3)
  assert refs["mean_disparity_rmse_objects"] == pytest.approx(3.0, rel=1e-6)
  assert refs["mean_disparity_rmse"] == pytest.approx(3.0 * np.sqrt(6 / 23), rel=1e-6)
  val_data.labels[:] = label_ids.ROAD  # no objects: no figure, not 0
  refs = references.trivial_references(train_data, val_data, 10, 5, batch=3)
  assert refs["mean_disparity_rmse_objects"] is None


def test_object_rmse_pools_the_object_pixels_of_real_images_only():
  from tcr_jax.model import evaluate
  m = evaluate.ObjectRMSE.from_model_output(
      object_sq=jnp.array([8.0, 100.0, 0.0]), object_count=jnp.array([2.0, 1.0, 0.0]),
      mask=jnp.array([1.0, 0.0, 1.0]))  # the second image is padding
  assert float(m.merge(m).compute()) == pytest.approx(2.0)
  empty = evaluate.ObjectRMSE.from_model_output(
      object_sq=jnp.zeros(2), object_count=jnp.zeros(2), mask=jnp.ones(2))
  assert np.isnan(empty.compute())


def test_per_pixel_mean_beats_a_constant_on_the_synthetic_scenes(configs):
  from tcr_jax.data import scene_dataset
  c = configs.smoke()
  tr, va = scene_dataset(c, "train"), scene_dataset(c, "validation")
  refs = references.trivial_references(tr, va, 64, 16)
  assert refs["mean_disparity_rmse"] < refs["constant_disparity_rmse"]
  assert 5.0 < refs["mean_image_psnr"] < 30.0


def test_cosine_schedule_runs_from_one_to_zero():
  s = lambda step: float(train.learning_rate_scale(jnp.float32(step), 100.0, "cosine"))
  assert s(0) == pytest.approx(1.0)
  assert s(50) == pytest.approx(0.5, abs=1e-6)
  assert s(100) == pytest.approx(0.0, abs=1e-6)
  assert s(25) > s(50) > s(75)
  assert float(train.learning_rate_scale(jnp.float32(70), 100.0, "constant")) == 1.0


def test_warmup_ramps_the_first_steps_then_follows_the_schedule():
  s = lambda step, schedule: float(train.learning_rate_scale(
      jnp.float32(step), 100.0, schedule, warmup=10))
  assert s(0, "constant") == pytest.approx(0.1)
  assert s(4, "constant") == pytest.approx(0.5)
  assert s(9, "constant") == s(50, "constant") == 1.0
  cosine = lambda step: float(train.learning_rate_scale(jnp.float32(step), 100.0, "cosine"))
  assert s(0, "cosine") == pytest.approx(0.1 * cosine(0))
  assert s(30, "cosine") == pytest.approx(cosine(30))


def test_negative_warmup_is_a_one_line_error(configs):
  from tcr_jax import configs_lib
  from tcr_jax.errors import UserError
  c = configs.smoke(**{"train.warmup_steps": -1})
  with pytest.raises(UserError, match="warmup_steps"):
    configs_lib.validate(c)


def test_schedule_scales_the_update():
  """A unit-step SGD state: the step taken is hp's learning_rate * scale *
  grad."""
  import optax
  params = {"w": jnp.ones((3,))}
  state = train.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(1.0),
                                  batch_stats={}, rng=jax.random.key(0))
  state = state.replace(step=jnp.asarray(50))

  def loss_fn(variables, batch, rng, hp, frozen):
    del rng, hp, frozen
    loss = jnp.sum(variables["params"]["w"] * batch["x"])
    return loss, ({"loss": loss}, {})

  batch = {"x": jnp.array([1.0, 2.0, 3.0])}
  hp = {"steps": jnp.float32(100), "learning_rate": jnp.float32(0.1)}
  for schedule, lr_scale, scale in (("constant", 1.0, 1.0), ("cosine", 1.0, 0.5),
                                    ("cosine", 0.5, 0.25)):
    new, _ = train.train_step(state, batch, {**hp, "lr_scale": jnp.float32(lr_scale)},
                              None, loss_fn=loss_fn, schedule=schedule)
    np.testing.assert_allclose(new.params["w"], 1.0 - 0.1 * scale * batch["x"], rtol=1e-6)


@pytest.mark.slow
def test_every_base_model_fine_tunes_its_methods_start(tmp_path, configs):
  c = configs.smoke(**{"sweep.standalone": False, "train.base_pretrain_steps": 2,
                       "train.base_steps": 1, "train.finetune_lr_scale": 0.5,
                       "train.enhancement_steps": 1,
                       "eval.reference_train_images": 64})
  c.sweep.alphas = (0.05, 0.2)
  records = sweep.train_and_evaluate(c, str(tmp_path))
  # The trivial references lead results.json, as the sweep computed them.
  ref = records[0]
  assert ref["layer"] == "reference" and all(r["layer"] != "reference" for r in records[1:])
  assert 0 < ref["mean_disparity_rmse"] < ref["constant_disparity_rmse"]
  # Objects stand out of the street's row prior: the mean map misses them most.
  assert ref["mean_disparity_rmse_objects"] > ref["mean_disparity_rmse"]
  assert all(r["depth_rmse_objects"] > 0 for r in records if r["layer"] == "base")
  assert "References (the trivial ones" in (tmp_path / "bd_rate.md").read_text()
  model = bases.for_config(c).base_model()
  x = jnp.zeros((1, c.data.height, c.data.width, 3))
  template = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))

  def params(stage):
    return checkpoints.load_variables(str(tmp_path / "stages" / stage), template)["params"]

  # One Adam step moves no parameter by more than the learning rate; models
  # started elsewhere would differ by the scale of their initialisation.
  bound = c.train.learning_rate * c.train.finetune_lr_scale * (1 + 1e-3)
  starts = {m: params(sweep.stage_name("base_start", m, c.sweep.alphas[0]))
            for m in c.sweep.methods}

  def distance(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)))

  for method in c.sweep.methods:
    other = next(m for m in c.sweep.methods if m != method)
    for alpha in c.sweep.alphas:
      p = params(sweep.stage_name("base", method, alpha))
      moved = distance(p, starts[method])
      assert 0 < moved <= bound, (method, alpha, moved)
      # Not the other method's start: each method trained its own.
      assert distance(p, starts[other]) > bound, (method, alpha)


@pytest.mark.slow
def test_chained_fine_tunes_start_from_the_previous_alpha(tmp_path, configs):
  c = configs.smoke(**{"sweep.standalone": False, "sweep.methods": ("proposal",),
                       "train.base_pretrain_steps": 2, "train.base_steps": 1,
                       "train.finetune_lr_scale": 0.5, "train.finetune_chain": True,
                       "train.enhancement_steps": 1})
  c.sweep.alphas = (0.05, 0.2)
  sweep.train_and_evaluate(c, str(tmp_path))
  model = bases.for_config(c).base_model()
  x = jnp.zeros((1, c.data.height, c.data.width, 3))
  template = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))

  def params(stage):
    p = checkpoints.load_variables(str(tmp_path / "stages" / stage), template)["params"]
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(p)])

  step = c.train.learning_rate * c.train.finetune_lr_scale * (1 + 1e-3)
  start = params(sweep.stage_name("base_start", "proposal", 0.05))
  first = params(sweep.stage_name("base", "proposal", 0.05))
  second = params(sweep.stage_name("base", "proposal", 0.2))
  # One Adam step from the model before it; two from the start (a second
  # model fine-tuning the start itself would be one step from it).
  assert 0 < float(jnp.max(jnp.abs(first - start))) <= step
  assert 0 < float(jnp.max(jnp.abs(second - first))) <= step
  assert float(jnp.max(jnp.abs(second - start))) > step


def test_bad_pretrain_fields_are_refused(configs):
  c = configs.load("depth_recon", "synthetic")
  with c.unlocked():
    c.train.finetune_lr_scale = 0.0
  with pytest.raises(UserError, match="finetune_lr_scale"):
    configs_lib.validate(c)


def test_depth_head_batch_norm_uses_the_configured_momentum(configs, random_variables):
  from tcr_jax.tasks import LRASPPMobileNetV3
  x = jnp.full((2, 32, 32, 3), 0.5)
  for momentum in (0.01, 0.1):
    head = LRASPPMobileNetV3(num_classes=1, backbone_bn_momentum=1.0 - momentum)
    v = random_variables(head, x, train=False)
    # Compiled: op by op, the head's forward pass takes 10 s on two cores.
    _, upd = jax.jit(functools.partial(head.apply, train=True,
                                       mutable=["batch_stats"]))(v, x)
    stem = v["batch_stats"]["backbone"]["stem"]["bn"]
    new = upd["batch_stats"]["backbone"]["stem"]["bn"]
    # running = (1 - m) * old + m * batch mean; old mean is 0, so new/m is
    # the same batch mean whichever m.
    batch_mean = np.asarray(new["mean"]) / momentum
    if momentum == 0.01:
      ref = batch_mean
    else:
      np.testing.assert_allclose(batch_mean, ref, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(new["mean"]) - np.asarray(stem["mean"])).max() > 0
  c = configs.load("depth_recon", "synthetic")
  with c.unlocked():
    c.task.depth_bn_momentum = 0.0
  with pytest.raises(UserError, match="depth_bn_momentum"):
    configs_lib.validate(c)


def _records():
  recs = [{"experiment": "depth_recon", "layer": "reference", "method": "trivial",
           "constant_disparity_rmse": 2.0, "mean_disparity_rmse": 1.0,
           "mean_image_psnr": 15.0}]
  for method, shift in (("baseline", 0.0), ("proposal", 0.1)):
    for i, alpha in enumerate((0.1, 0.3, 1.0, 3.0)):
      bpp = 0.4 / (i + 1)
      recs.append({"experiment": "depth_recon", "layer": "base", "method": method,
                   "alpha": alpha, "bpp_base": bpp, "depth_rmse": 0.5 + 0.1 * i - shift,
                   "psnr_from_base": 20.0 - i + 10 * shift})
      recs.append({"experiment": "depth_recon", "layer": "enhancement",
                   "method": method, "alpha": alpha, "bpp_base": bpp,
                   "bpp_enhancement": bpp, "psnr": 25.0 - i,
                   "depth_rmse": 0.5, "psnr_from_base": 20.0})
  return recs


def test_report_sets_references_next_to_the_best_models(tmp_path):
  text = rd.write_report(_records(), str(tmp_path), "depth_recon")
  lines = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| depth") or l.startswith("| PSNR")}
  per_pixel = lines["depth RMSE (px) predicting the per-pixel mean disparity"]
  cells = [c.strip() for c in per_pixel.split("|")[2:5]]
  assert cells == ["1.000", "0.500", "0.400"]  # reference, best baseline, best proposal
  psnr = [c.strip() for c in lines["PSNR (dB) of the mean training image"].split("|")[2:5]]
  assert psnr == ["15.000", "20.000", "21.000"]
  assert (tmp_path / "bd_rate.md").read_text() == text
  assert any(p.name.startswith("rd_") for p in tmp_path.iterdir())


def test_report_gives_the_rewards_share_of_the_proposals_base_loss(tmp_path):
  recs = _records()
  for r in recs:
    if r["layer"] == "base" and r["method"] == "proposal":
      # L_b = alpha * R_b + D_b + reward, with a reward of 0.25 * D_b.
      r.update(beta=0.01, loss=r["alpha"] * r["bpp_base"] + 1.25 * r["depth_rmse"])
  text = rd.write_report(recs, str(tmp_path), "depth_recon")
  rows = [l for l in text.splitlines() if l.startswith("| ") and l.endswith("| 0.25 |")]
  assert len(rows) == 4 and rows[0].startswith("| 0.1 | 0.01 | 0.400 | 0.100 |")
  # The baseline (beta 0) has no reward row; records without a loss none.
  assert "reward" not in rd.write_report(_records(), str(tmp_path), "depth_recon")


def test_report_without_references_has_no_reference_table(tmp_path):
  without = rd.write_report(_records()[1:], str(tmp_path), "depth_recon")
  with_refs = rd.write_report(_records(), str(tmp_path), "depth_recon")
  assert "References (" not in without and "References (" in with_refs
  # The references only add their table after the BD-rates.
  assert with_refs.startswith(without.rstrip("\n"))


@pytest.mark.parametrize("experiment", ["depth_recon", "depth_seg"])
def test_the_demo_is_the_reproduction_with_smaller_caps(experiment):
  """`make demo` runs the reproduction's regime (beta, alphas, schedule,
  early stopping, test split, model, scenes) and only trains less."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out
  demo = flat(configs_lib.load_config(f"configs/{experiment}.py:synthetic").to_dict())
  full = flat(configs_lib.load_config(f"configs/{experiment}.py:reproduction").to_dict())
  caps = ("train.base_pretrain_steps", "train.base_steps", "train.enhancement_steps",
          "data.eval_images")
  differ = {k for k in full if demo.get(k) != full[k]}
  assert differ == {"variant", *caps}, differ
  assert all(demo[k] < full[k] for k in caps)
  assert demo["sweep.beta"] == 0.005 and demo["eval.split"] == "test"
