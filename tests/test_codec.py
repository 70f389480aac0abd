"""Tests of the codec core: quantization, transforms, entropy models."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tcr_jax.codec import entropy, entropy_models, layers, ops, transforms
from tcr_jax.model import models

TINY = dict(latent_channels=8, widths=(4, 6, 8), blocks=1)


# ---------------------------------------------------------------- quantization

def test_ste_round_forward_rounds_ties_toward_zero():
  x = jnp.array([-2.5, -1.5, -0.5, -0.4, 0.0, 0.4, 0.5, 0.6, 1.5, 2.5, 2.51])
  np.testing.assert_array_equal(
      ops.ste_round(x), [-2, -1, 0, 0, 0, 0, 0, 1, 1, 2, 3])


def test_ste_round_gradient_is_identity():
  x = jax.random.normal(jax.random.key(0), (5, 7)) * 3
  w = jax.random.normal(jax.random.key(1), (5, 7))
  g = jax.grad(lambda v: jnp.sum(ops.ste_round(v) * w))(x)
  np.testing.assert_array_equal(g, w)


def test_noise_quantizer_trains_with_noise_and_evaluates_rounded():
  x = jax.random.normal(jax.random.key(0), (1000,)) * 4
  noisy = ops.quantize(x, "noise", jax.random.key(1), train=True)
  d = np.asarray(noisy - x)
  assert d.min() >= -0.5 and d.max() < 0.5 and d.std() > 0.25
  np.testing.assert_array_equal(ops.quantize(x, "noise", train=False),
                                ops.ste_round(x))
  with pytest.raises(ValueError, match="rng"):
    ops.quantize(x, "noise", None, train=True)
  with pytest.raises(ValueError, match="quantizer"):
    ops.quantize(x, "dither")


# ---------------------------------------------------------------- likelihoods

@pytest.mark.parametrize("scale", [0.11, 0.5, 3.0, 37.0, 256.0])
def test_discretized_gaussian_sums_to_one(scale):
  rng = np.random.default_rng(int(scale * 100))
  for mean in rng.uniform(-50, 50, size=3):
    half = int(math.ceil(5.5 * scale)) + 8
    k = np.arange(math.floor(mean) - half, math.floor(mean) + half + 1)
    y_hat = jnp.asarray(k, jnp.float32)
    residual = ops.ste_round(y_hat - jnp.float32(mean))
    p = entropy.gaussian_likelihood(residual, jnp.full_like(y_hat, scale))
    assert abs(float(np.sum(np.asarray(p, np.float64))) - 1.0) < 1e-6


def test_discretized_gaussian_bounds():
  r = jnp.array([0.0, 0.0, 40.0])
  p = entropy.gaussian_likelihood(r, jnp.array([0.01, 0.11, 0.11]))
  assert float(p[0]) == pytest.approx(float(p[1]))  # scale bounded at 0.11
  assert float(p[2]) == pytest.approx(1e-9)  # likelihood bounded at 1e-9


def test_lower_bound_passes_gradients_that_raise_the_value():
  f = lambda x: jnp.sum(entropy.lower_bound(x, 1.0) * jnp.array([-1.0, 1.0, -1.0]))
  g = jax.grad(f)(jnp.array([0.5, 0.5, 2.0]))
  # below the bound: a loss decreasing with x passes, one increasing does not.
  np.testing.assert_array_equal(g, [-1.0, 0.0, -1.0])


def test_factorized_prior_sums_to_one_and_bits_match():
  prior = entropy_models.FactorizedPrior(channels=3)
  z = jnp.zeros((1, 1, 1, 3))
  params = prior.init(jax.random.key(0), z)
  # Perturb the initialisation so the density is not the symmetric default.
  params = jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), params)
  k = jnp.arange(-400, 401, dtype=jnp.float32)
  grid = jnp.broadcast_to(k[None, :, None, None], (1, k.size, 1, 3))
  p = prior.apply(params, grid, method=prior.likelihood)
  sums = np.asarray(p, np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(sums, 1.0, atol=1e-6)
  z = jnp.round(jax.random.normal(jax.random.key(2), (2, 3, 4, 3)) * 5)
  z_hat, lik = prior.apply(params, z)
  np.testing.assert_array_equal(z_hat, z)
  expected = -np.log2(np.asarray(lik, np.float64)).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(entropy.bits(lik), expected, rtol=1e-5)


def test_bits_and_bpp_of_a_mapping():
  lik = {"y": jnp.full((2, 2, 2, 1), 0.5), "z": jnp.full((2, 1, 1, 1), 0.25)}
  np.testing.assert_allclose(entropy.bits(lik), [6.0, 6.0])
  assert float(entropy.bpp(lik, num_pixels=3)) == pytest.approx(2.0)


# ---------------------------------------------------------------- layers

def conv_transpose_reference(x: jax.Array, kernel: jax.Array,
                             bias: jax.Array) -> jax.Array:
  """Definition of ConvTranspose2d(k=5, s=2, p=2, op=1).

  A transposed convolution is a convolution of the 2x-dilated input with the
  spatially flipped kernel, padded k - 1 - p = 2 before and 2 + 1 after.
  """
  y = jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((2, 3), (2, 3)),
      lhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias


def test_subpixel_conv_equals_transposed_conv():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 4))
  layer = layers.SubpixelConvTranspose(3)
  v = layer.init(jax.random.key(1), x)
  v = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), v)
  with jax.default_matmul_precision("highest"):
    y = layer.apply(v, x)
    ref = conv_transpose_reference(x, v["params"]["kernel"],
                                          v["params"]["bias"])
  assert y.shape == (2, 10, 14, 3)
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_subpixel_conv_equals_torch_conv_transpose2d():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tconv = torch.nn.ConvTranspose2d(4, 3, 5, stride=2, padding=2, output_padding=1)
  x = torch.randn(2, 4, 6, 9)
  with torch.no_grad():
    ref = tconv(x).permute(0, 2, 3, 1).numpy()
  params = {"kernel": jnp.asarray(tconv.weight.detach().numpy().transpose(2, 3, 0, 1)),
            "bias": jnp.asarray(tconv.bias.detach().numpy())}
  with jax.default_matmul_precision("highest"):
    y = layers.SubpixelConvTranspose(3).apply(
        {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_downsample_2x_is_bilinear_half_pixel_resize():
  x = jax.random.uniform(jax.random.key(0), (2, 8, 12, 3))
  ref = jax.image.resize(x, (2, 4, 6, 3), "bilinear", antialias=False)
  np.testing.assert_allclose(ops.downsample_2x(x), ref, atol=1e-6)


def test_depth_to_space_layout():
  x = jnp.arange(2 * 3 * 4 * 8, dtype=jnp.float32).reshape(2, 3, 4, 8)
  y = ops.depth_to_space(x, 2)
  assert y.shape == (2, 6, 8, 2)
  # output (2i + a, 2j + b, c) reads channel (2a + b) * C + c of input (i, j)
  np.testing.assert_array_equal(y[1, 2 * 2 + 1, 2 * 3 + 0, 1], x[1, 2, 3, (2 * 1 + 0) * 2 + 1])


def test_pad_and_crop_round_trip():
  x = jax.random.uniform(jax.random.key(0), (1, 33, 65, 3))
  padded, size = ops.pad_to_multiple(x, 16)
  assert padded.shape == (1, 48, 80, 3) and size == (33, 65)
  np.testing.assert_array_equal(ops.crop(padded, size), x)
  np.testing.assert_array_equal(padded[:, 40, :65], x[:, 32])  # edge replicated


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("hw", [(32, 64), (48, 80), (33, 65), (17, 31)])
def test_transform_shapes(hw):
  h, w = hw
  x = jax.random.uniform(jax.random.key(0), (2, h, w, 3))
  padded, size = ops.pad_to_multiple(x, transforms.AnalysisTransform.downsampling)
  g_a = transforms.AnalysisTransform(8, (4, 6, 8), blocks=1)
  y, _ = jax.eval_shape(g_a.init_with_output, jax.random.key(1), padded)
  assert y.shape == (2, math.ceil(h / 16), math.ceil(w / 16), 8)
  g_s = transforms.SynthesisTransform(3, (8, 6, 4), blocks=2)
  x_hat, _ = jax.eval_shape(g_s.init_with_output, jax.random.key(2), y)
  assert x_hat.shape == padded.shape
  assert ops.crop(jnp.zeros(x_hat.shape), size).shape == x.shape


def test_default_transforms_have_the_papers_widths():
  x = jnp.zeros((1, 32, 32, 3))
  g_a = transforms.AnalysisTransform()
  params = jax.eval_shape(g_a.init, jax.random.key(0), x)["params"]
  kernels = [params[k]["kernel"].shape for k in sorted(params, key=lambda n: int(n.split("_")[-1]))
             if k.startswith("Conv")]
  assert kernels == [(5, 5, 3, 24), (5, 5, 24, 48), (5, 5, 48, 192), (5, 5, 192, 192)]
  n_blocks = sum(k.startswith("ResidualBottleneck") for k in params)
  assert n_blocks == 9


def test_image_codec_handles_odd_sizes_and_jits():
  codec = models.ImageCodec(**TINY, hyper_channels=4)
  x = jax.random.uniform(jax.random.key(0), (2, 40, 72, 3))
  params = jax.jit(codec.init)(jax.random.key(1), x)
  x_hat, lik = jax.jit(codec.apply)(params, x)
  assert x_hat.shape == x.shape
  assert lik["y"].shape == (2, 3, 5, 8) and lik["z"].shape == (2, 1, 2, 4)
  assert np.all(np.isfinite(entropy.bits(lik)))


# ---------------------------------------------------------------- entropy models

def _random_latent(shape, seed=0, scale=3.0):
  return jnp.round(jax.random.normal(jax.random.key(seed), shape) * scale)


@pytest.mark.parametrize("kind", entropy_models.BASE_KINDS)
def test_entropy_models_return_latent_and_likelihoods(kind):
  model = entropy_models.make_entropy_model(kind, 6, hyper_channels=4)
  y = jax.random.normal(jax.random.key(0), (2, 4, 8, 6)) * 3
  v = jax.jit(model.init)(jax.random.key(1), y)
  y_hat, lik = jax.jit(model.apply)(v, y)
  np.testing.assert_array_equal(y_hat, ops.ste_round(y))
  assert lik["y"].shape == y.shape
  assert ("z" in lik) == (kind != "context")
  p = np.asarray(lik["y"])
  assert np.all((p >= 1e-9) & (p <= 1.0))


def _params(model, variables, y_hat, z_hat=None, side=None):
  scale, mean = model.apply(variables, y_hat, z_hat, side, method=model.parameters)
  return np.asarray(jnp.concatenate([scale, mean], -1))


def test_serial_context_is_causal():
  model = entropy_models.make_entropy_model("context", 4)
  y = _random_latent((1, 6, 7, 4))
  v = model.init(jax.random.key(1), y)
  base = _params(model, v, y)
  h, w = y.shape[1:3]
  for (i, j) in [(0, 0), (2, 3), (3, 0), (5, 6)]:
    changed = _params(model, v, y.at[0, i, j, 1].add(5.0))
    diff = np.abs(changed - base).max(axis=-1)[0]
    order = np.arange(h * w).reshape(h, w)
    earlier_or_same = order <= i * w + j
    assert diff[earlier_or_same].max() == 0.0, (i, j)
    if i * w + j < h * w - 1:
      # the next raster position reads this one: the test can fail
      assert diff[order == i * w + j + 1].max() > 0.0


def test_checkerboard_context_is_two_pass_causal():
  model = entropy_models.make_entropy_model("checkerboard", 4, hyper_channels=4)
  y = _random_latent((1, 8, 8, 4))
  v = model.init(jax.random.key(1), y)
  z_hat = _random_latent((1, 2, 2, 4), seed=3)
  base = _params(model, v, y, z_hat)
  anchors = np.asarray(entropy_models.checkerboard_anchor_mask(8, 8))[0, :, :, 0] > 0
  # A non-anchor (second pass) changes nothing at all: nobody reads it.
  changed = _params(model, v, y.at[0, 3, 4, 0].add(5.0), z_hat)
  np.testing.assert_array_equal(changed, base)
  # An anchor changes no anchor but some neighbouring non-anchors.
  changed = _params(model, v, y.at[0, 4, 4, 0].add(5.0), z_hat)
  diff = np.abs(changed - base).max(axis=-1)[0]
  assert diff[anchors].max() == 0.0
  assert diff[~anchors].max() > 0.0
  # The hyper-latent reaches every position.
  changed = _params(model, v, y, z_hat.at[0, 0, 0, 0].add(3.0))
  assert np.abs(changed - base).max(axis=-1)[0][anchors].max() > 0.0


def test_conditional_model_uses_side_information_causally():
  model = entropy_models.make_conditional_model(4, side_channels=5)
  y = _random_latent((1, 5, 6, 4))
  side = jax.random.normal(jax.random.key(2), (1, 5, 6, 5))
  v = model.init(jax.random.key(1), y, side)
  base = _params(model, v, y, side=side)
  standalone = _params(model, v, y, side=None)
  zeros = _params(model, v, y, side=jnp.zeros_like(side))
  np.testing.assert_array_equal(standalone, zeros)
  assert np.abs(standalone - base).max() > 0.0
  changed = _params(model, v, y.at[0, 2, 3, 0].add(5.0), side=side)
  diff = np.abs(changed - base).max(axis=-1)[0]
  assert diff[:2].max() == 0.0 and diff[2, :4].max() == 0.0
  assert diff[2, 4] > 0.0


def test_unknown_entropy_model_is_refused():
  with pytest.raises(ValueError, match="hyperprior"):
    entropy_models.make_entropy_model("gmm", 4)


# ---------------------------------------------------------------- fitting

def _fit(model, y, steps=40, lr=1e-2):
  variables = jax.jit(model.init)(jax.random.key(0), y)
  tx = optax.adam(lr)
  params = variables["params"]
  state = tx.init(params)

  def rate(p):
    _, lik = model.apply({"params": p}, y, train=True)
    return jnp.mean(entropy.bits(lik))

  @jax.jit
  def step(p, s):
    r, g = jax.value_and_grad(rate)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, r

  first = None
  for _ in range(steps):
    params, state, r = step(params, state)
    first = float(r) if first is None else first
  return first, float(jax.jit(rate)(params))


def test_fitting_the_factorized_prior_lowers_the_rate():
  z = jax.random.laplace(jax.random.key(3), (8, 4, 4, 3)) * jnp.array([1.0, 4.0, 20.0])
  first, last = _fit(entropy_models.FactorizedPrior(channels=3), z)
  assert last < 0.9 * first


def test_fitting_the_hyperprior_lowers_the_rate():
  y = jax.random.normal(jax.random.key(3), (4, 8, 8, 4)) * jnp.array([0.5, 2.0, 8.0, 30.0])
  first, last = _fit(entropy_models.make_entropy_model("hyperprior", 4,
                                                      hyper_channels=4), y)
  assert last < 0.9 * first
