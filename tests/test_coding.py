"""Tests of entropy coding: exact decoding, robustness, rates, image files."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from tcr_jax.bench import codec as bench_codec
from tcr_jax.model import models
from tcr_jax.codec import (bitstream, entropy, entropy_models, files,
                           latent_coding, ops, symbols, tables)
from tcr_jax.codec.bitstream import BitstreamError

C = 8
SIDE_C = 6
SHAPE = (1, 5, 7, C)
TINY = dict(latent_channels=8, widths=(4, 6, 8), blocks=1, hyper_channels=4)

MODELS = {
    "hyperprior": (lambda: entropy_models.make_entropy_model(
        "hyperprior", C, hyper_channels=4), False),
    "checkerboard": (lambda: entropy_models.make_entropy_model(
        "checkerboard", C, hyper_channels=4), False),
    "context": (lambda: entropy_models.make_entropy_model("context", C), False),
    "conditional-serial": (lambda: entropy_models.make_conditional_model(
        C, SIDE_C, "serial"), True),
    "conditional-serial-standalone": (
        lambda: entropy_models.make_conditional_model(C, SIDE_C, "serial"), False),
    "conditional-none": (lambda: entropy_models.make_conditional_model(
        C, SIDE_C, "none"), True),
    "conditional-checkerboard": (lambda: entropy_models.make_conditional_model(
        C, SIDE_C, "checkerboard"), True),
}


def _latent(seed: int = 0, shape=SHAPE) -> jax.Array:
  """Gaussian latent with far outliers (escapes) and exact .5 ties."""
  rng = np.random.default_rng(seed)
  y = rng.normal(0, 3, shape).astype(np.float32)
  y[0, 0, 0, :4] = [300.3, -5000.7, 2.5, -0.5]
  y[0, 2, 3, :3] = [40.5, 1e6, -1.5]
  return jnp.asarray(y)


def _spread(variables, seed: int):
  """Predicted scales over the whole table (and beyond) and means of both
  signs, instead of the clamped scales of a fresh initialisation."""
  params = jax.tree_util.tree_map(np.array, jax.device_get(variables["params"]))
  rng = np.random.default_rng(seed)
  out = params["entropy_parameters"]["Conv_2"]
  out["kernel"] *= 0.5
  out["bias"][:C] = np.exp(rng.uniform(math.log(0.05), math.log(400.0), C))
  out["bias"][C:] = rng.uniform(-20.0, 20.0, C)
  return {"params": jax.tree_util.tree_map(jnp.asarray, params)}


_CACHE = {}


def _setup(name: str):
  if name not in _CACHE:
    factory, with_side = MODELS[name]
    em = factory()
    side = (jnp.asarray(np.random.default_rng(9).normal(
        0, 2, SHAPE[:3] + (SIDE_C,)), jnp.float32) if with_side else None)
    variables = em.init(jax.random.key(1), _latent(), side)
    _CACHE[name] = em, _spread(variables, seed=len(name)), side
  return _CACHE[name]


def _snap(tol: float):
  """Moves every third element's parameters to within tol/2 of a boundary
  (a deterministic function of the parameters and the element index)."""
  boundaries = tables.scale_boundaries()

  def transform(scale, mean, flat):
    pick = flat % 3 == 0
    offset = ((flat * 2654435761 % 997) / 997.0 - 0.5) * tol
    s = np.maximum(np.asarray(scale, np.float64), tables.SCALE_MIN)
    k = np.clip(np.rint(tables._scale_position(s)), 1, tables.SCALE_LEVELS - 1)
    b = boundaries[k.astype(int)]
    m = np.asarray(mean, np.float64)
    half = np.floor(m) + 0.5
    return (np.where(pick, b + offset * np.maximum(1, b), s),
            np.where(pick, half + offset * np.maximum(1, np.abs(half)), m))

  return transform


def _noisy(transform, size: float):
  """`transform`, then noise of relative size `size` (another backend)."""

  def noisy(scale, mean, flat):
    scale, mean = transform(scale, mean, flat)
    rng = np.random.default_rng(flat[:1].tolist() + [len(flat)])
    u = rng.uniform(-size, size, (2, len(flat)))
    return (scale + u[0] * np.maximum(1, np.abs(scale)),
            mean + u[1] * np.maximum(1, np.abs(mean)))

  return noisy


# ---------------------------------------------------------------- host math

def test_deterministic_functions_match_libm():
  x = np.linspace(-40, 40, 20001)
  np.testing.assert_allclose(tables._dexp(x), np.exp(x), rtol=1e-15)
  xp = np.exp(np.linspace(-600, 600, 20001))
  np.testing.assert_allclose(tables._dlog(xp), np.log(xp), rtol=1e-15, atol=1e-15)
  np.testing.assert_allclose(tables._dtanh(x), np.tanh(x), atol=1e-15)
  np.testing.assert_allclose(tables._dsigmoid(x), scipy.special.expit(x),
                             rtol=1e-14, atol=1e-300)
  np.testing.assert_allclose(tables._dsoftplus(x), np.logaddexp(0, x),
                             rtol=1e-14, atol=1e-15)
  z = np.linspace(0, 26, 20001)
  np.testing.assert_allclose(tables._derfc(z), scipy.special.erfc(z), rtol=1e-13)


def test_gaussian_tables_cover_the_scale_range():
  gt = tables.gaussian_tables()
  scales = gt.scales
  assert len(scales) == tables.SCALE_LEVELS
  assert scales[0] == pytest.approx(0.11) and scales[-1] == pytest.approx(256)
  np.testing.assert_allclose(np.diff(np.log(scales)),
                             np.log(256 / 0.11) / (tables.SCALE_LEVELS - 1))
  for s, k, pmf in zip(scales, gt.half_widths, gt.pmfs):
    assert pmf.shape == (2 * k + 2,) and abs(pmf.sum() - 1) < 1e-12
    assert 2 * scipy.special.ndtr(-(k + 0.5) / s) < 1e-9  # escape mass
    r = np.arange(-k, k + 1)
    exact = (scipy.special.ndtr((0.5 - np.abs(r)) / s)
             - scipy.special.ndtr((-0.5 - np.abs(r)) / s))
    big = exact > 1e-6
    np.testing.assert_allclose(pmf[:-1][big], exact[big], rtol=1e-4)


def test_parameter_quantization_and_fix_lists():
  table = tables.scale_table()
  bounds = tables.scale_boundaries()
  # nearest level in log; the clamp at 0.11 and beyond 256
  np.testing.assert_array_equal(tables.scale_index(table), np.arange(64))
  assert tables.scale_index([0.01, 0.11, 1e4]).tolist() == [0, 0, 63]
  assert tables.scale_index([bounds[5] * 0.999,
                             bounds[5] * 1.001]).tolist() == [4, 5]
  # listed elements take the side below their nearest boundary
  assert tables.scale_index([bounds[5] * 1.001], [True]).tolist() == [4]
  assert tables.scale_index([bounds[5] * 0.999], [True]).tolist() == [4]
  np.testing.assert_array_equal(tables.centre([-1.5, -0.5001, 0.4999, 0.5, 2.7]),
                                [-1, -1, 0, 1, 3])
  np.testing.assert_array_equal(
      tables.centre([2.5001, 2.4999, -0.5001], [True, True, True]), [2, 2, -1])
  # beyond +-CENTRE_LIMIT the centre is 0; near the limit, listed ones round
  limit = tables.CENTRE_LIMIT
  np.testing.assert_array_equal(
      tables.centre([limit - 0.6, limit + 0.01, -limit - 3, 1e9]),
      [limit - 1, 0, 0, 0])
  np.testing.assert_array_equal(
      tables.centre([limit + 0.01, -limit + 0.01], [True, True]), [limit, -limit])
  near_s, near_c = tables.boundary_flags(
      [bounds[7] * (1 + 1e-5), bounds[7] * 1.01, 0.11, 300.0, 1.0, 1.0],
      [0.5 + 1e-5, 0.49, 100.5 + 1e-3, -0.5, limit + 1e-3, limit + 0.5],
      tol=2e-5)
  assert near_s.tolist() == [True, False, False, False, False, False]
  assert near_c.tolist() == [True, False, True, True, True, False]
  with pytest.raises(ValueError, match="tol"):
    tables.boundary_flags([1.0], [0.0], tol=1e-3)


def test_integer_and_position_codes_round_trip():
  import constriction
  rng = np.random.default_rng(0)
  values = np.concatenate([[0, 1, 2, 2 ** 40 - 1], rng.integers(0, 10 ** 9, 50)])
  positions = np.sort(rng.choice(10 ** 6, 300, replace=False))
  enc = constriction.stream.queue.RangeEncoder()
  symbols._encode_uints(enc, values)
  ideal = symbols._encode_positions(enc, positions, 10 ** 6)
  symbols._encode_positions(enc, np.array([], np.int64), 10)
  symbols._encode_positions(enc, np.array([0, 5, 6, 9]), 10)
  dec = constriction.stream.queue.RangeDecoder(enc.get_compressed())
  np.testing.assert_array_equal(symbols._decode_uints(dec, len(values)), values)
  np.testing.assert_array_equal(symbols._decode_positions(dec, 10 ** 6), positions)
  assert symbols._decode_positions(dec, 10).tolist() == []
  assert symbols._decode_positions(dec, 10).tolist() == [0, 5, 6, 9]
  # near the entropy of 300 positions among 10^6: log2 C(10^6, 300)
  entropy_bits = (math.lgamma(10 ** 6 + 1) - math.lgamma(301)
                  - math.lgamma(10 ** 6 - 299)) / math.log(2)
  assert entropy_bits < ideal < 1.05 * entropy_bits + 20


def test_factorized_tables_match_the_prior():
  em, variables, _ = _setup("hyperprior")
  prior = variables["params"]["z_prior"]
  ft = tables.factorized_tables(prior)
  z = np.arange(-60, 61, dtype=np.float32)
  lik = entropy_models.FactorizedPrior(4).apply(
      {"params": prior}, jnp.asarray(np.broadcast_to(z[None, :, None, None],
                                                     (1, 121, 1, 4)).copy()),
      method="likelihood")
  for ch in range(4):
    lo, hi, pmf = ft.lo[ch], ft.hi[ch], ft.pmfs[ch]
    assert abs(pmf.sum() - 1) < 1e-12 and lo <= hi
    inside = (z >= lo) & (z <= hi)
    expected = np.asarray(lik[0, :, 0, ch])[inside]
    big = expected > 1e-5
    np.testing.assert_allclose(pmf[(z[inside] - lo).astype(int)][big],
                               expected[big], rtol=2e-4)
    assert np.asarray(lik[0, :, 0, ch])[~inside].sum() < 1e-8
  assert tables.factorized_tables(prior) is ft  # cached


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", list(MODELS))
def test_decode_is_exact(name):
  em, variables, side = _setup(name)
  y = _latent(seed=len(name))
  expected = ops.ste_round(y)
  streams, info = latent_coding.encode_latent(em, variables, y, side)
  assert set(streams) == ({"hyper", "y"} if em.hyperprior else {"y"})
  assert info["escapes"] > 0
  np.testing.assert_array_equal(info["y_hat"], expected)
  y_hat = latent_coding.decode_latent(em, variables, streams, y.shape, side)
  np.testing.assert_array_equal(y_hat, expected)
  # parameters on quantization boundaries: listed, and still exact
  snap = _snap(tables.DEFAULT_TOL)
  streams, info = latent_coding.encode_latent(em, variables, y, side,
                                       param_transform=snap)
  assert info["listed"]["scale"] > 0 and info["listed"]["centre"] > 0
  y_hat = latent_coding.decode_latent(em, variables, streams, y.shape, side,
                               param_transform=snap)
  np.testing.assert_array_equal(y_hat, expected)


@pytest.mark.parametrize("name", ["hyperprior", "checkerboard", "context",
                                  "conditional-serial"])
def test_decode_survives_another_backends_parameter_noise(name):
  em, variables, side = _setup(name)
  y = _latent(seed=3)
  tol = tables.DEFAULT_TOL
  snap = _snap(tol)
  noisy = _noisy(snap, tol / 4)  # crosses the boundary for ~half the snapped
  streams, info = latent_coding.encode_latent(em, variables, y, side, tol=tol,
                                       param_transform=snap)
  listed = info["listed"]["scale"] + info["listed"]["centre"]
  # every snapped scale, and the snapped means inside +-CENTRE_LIMIT
  assert listed >= 1.5 * len(range(0, y.size, 3))
  y_hat = latent_coding.decode_latent(em, variables, streams, y.shape, side,
                               param_transform=noisy)
  np.testing.assert_array_equal(y_hat, ops.ste_round(y))
  # Without fix lists (tol = 0) the same noise changes the decoder's choices;
  # the latent checksum reports it instead of returning garbage.
  streams, info = latent_coding.encode_latent(em, variables, y, side, tol=0.0,
                                       param_transform=snap)
  assert info["listed"] == {"scale": 0, "centre": 0}
  with pytest.raises(BitstreamError):
    latent_coding.decode_latent(em, variables, streams, y.shape, side,
                         param_transform=noisy)


@pytest.mark.parametrize("name", ["checkerboard", "conditional-serial"])
def test_decode_with_perturbed_network_weights(name):
  # another backend, simulated by relative 1e-6 noise on the weights of the
  # parameter networks (the prior's tables come from identical weights)
  em, variables, side = _setup(name)
  y = jnp.asarray(np.random.default_rng(7).normal(0, 3, (1, 12, 12, C)),
                  jnp.float32)
  if side is not None:
    side = jnp.asarray(np.random.default_rng(2).normal(0, 2, (1, 12, 12, SIDE_C)),
                       jnp.float32)
  rng = np.random.default_rng(0)
  perturbed = {"params": {
      k: v if k == "z_prior" else jax.tree_util.tree_map(
          lambda a: a * (1 + 1e-6 * rng.standard_normal(a.shape)).astype(
              np.float32), v)
      for k, v in variables["params"].items()}}
  s0, m0 = latent_coding.latent_parameters(em, variables, y, side)
  s1, m1 = latent_coding.latent_parameters(em, perturbed, y, side)
  deviation = max(np.max(np.abs(s1 - s0) / np.maximum(1, np.abs(s0))),
                  np.max(np.abs(m1 - m0) / np.maximum(1, np.abs(m0))))
  assert 0 < deviation < tables.DEFAULT_TOL
  streams, _ = latent_coding.encode_latent(em, variables, y, side)
  y_hat = latent_coding.decode_latent(em, perturbed, streams, y.shape, side)
  np.testing.assert_array_equal(y_hat, ops.ste_round(y))


def test_decode_latent_rejects_garbage_with_bitstream_error():
  rng = np.random.default_rng(0)
  for name in ("hyperprior", "context"):
    em, variables, side = _setup(name)
    streams, _ = latent_coding.encode_latent(em, variables, _latent(), side)
    for trial in range(4):
      bad = {k: rng.bytes(len(v) - 4 * (trial % 2)) for k, v in streams.items()}
      with pytest.raises(BitstreamError):
        latent_coding.decode_latent(em, variables, bad, SHAPE, side)
    with pytest.raises(BitstreamError):
      latent_coding.decode_latent(em, variables, {"y": b"abc"}, SHAPE, side)
    with pytest.raises(BitstreamError):
      latent_coding.decode_latent(em, variables, {}, SHAPE, side)


@pytest.mark.parametrize("name", ["hyperprior", "context"])
def test_mutated_latent_streams_raise_only_bitstream_errors(name):
  # below the container (whose checksums stop these first): the decoder
  # itself must fail cleanly, or decode exactly when a mutation only touched
  # padding bits
  em, variables, side = _setup(name)
  y = _latent(seed=11)
  streams, _ = latent_coding.encode_latent(em, variables, y, side)
  rng = np.random.default_rng(1)
  refused = 0
  for trial in range(40 if name == "hyperprior" else 12):
    key = sorted(streams)[trial % len(streams)]
    data = bytearray(streams[key])
    pos = rng.integers(len(data) * 8)
    data[pos // 8] ^= 1 << (pos % 8)
    try:
      y_hat = latent_coding.decode_latent(em, variables, {**streams, key: bytes(data)},
                                   y.shape, side)
    except BitstreamError:
      refused += 1
    else:
      np.testing.assert_array_equal(y_hat, ops.ste_round(y))
  assert refused > 0


# ---------------------------------------------------------------- image files

@pytest.fixture(scope="module")
def tiny_codecs():
  image = bench_codec.smooth_image(256, 512, seed=1)
  out = {}
  for kind in ("hyperprior", "checkerboard", "context"):
    model = models.ImageCodec(entropy_model_name=kind, **TINY)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    out[kind] = model, bench_codec.realistic_variables(model, variables, image)
  return out, image


@pytest.mark.parametrize("kind", ["hyperprior", "checkerboard", "context"])
def test_file_size_matches_the_estimated_rate(tiny_codecs, kind):
  codecs, image = tiny_codecs
  model, variables = codecs[kind]
  _, likelihoods = model.apply(variables, jnp.asarray(image))
  estimate = {"hyper": float(entropy.bits(likelihoods["z"])[0])
              if "z" in likelihoods else None,
              "y": float(entropy.bits(likelihoods["y"])[0])}
  data, info = files.encode_image(model, variables, image)
  assert estimate["y"] > 5000  # a meaningful rate, not a degenerate one
  per_stream_overhead = 64  # range-coder flush and 32-bit word alignment
  for name, bits in info["bits"].items():
    assert bits <= 1.01 * estimate[name] + per_stream_overhead, (name, bits)
  total_estimate = sum(v for v in estimate.values() if v is not None)
  assert info["file_bits"] <= (1.01 * total_estimate + info["header_bits"]
                               + per_stream_overhead * len(info["bits"]))
  assert info["side_bits"] < 0.01 * estimate["y"]


@pytest.mark.parametrize("kind", ["hyperprior", "context"])
def test_compress_is_deterministic_and_decompresses(tiny_codecs, kind):
  codecs, _ = tiny_codecs
  model, variables = codecs[kind]
  image = (bench_codec.smooth_image(40, 56, seed=2)[0] * 255).astype(np.uint8)
  data = files.compress(model, variables, image)
  assert files.compress(model, variables, image) == data
  assert files.compress(model, variables, image[None]) == data
  x_hat, info = files.decompress(model, variables, data)
  x = jnp.asarray(image[None], jnp.float32) / 255
  expected, _ = model.apply(variables, x)
  assert x_hat.shape == (1, 40, 56, 3)
  assert (info["height"], info["width"]) == (40, 56)
  assert info["bits"] == 8 * len(data)
  np.testing.assert_allclose(x_hat, expected, atol=1e-5)
  y = model.apply(variables, x, method="analysis")
  np.testing.assert_array_equal(info["y_hat"], ops.ste_round(y))


def test_decompress_refuses_another_model(tiny_codecs):
  codecs, image = tiny_codecs
  model, variables = codecs["hyperprior"]
  data = files.compress(model, variables, image[:, :32, :32])
  other = jax.tree_util.tree_map(lambda a: a * 1.0001, variables)
  with pytest.raises(BitstreamError, match="different model"):
    files.decompress(model, other, data)
  context_model, context_vars = codecs["context"]
  with pytest.raises(BitstreamError, match="different model"):
    files.decompress(context_model, context_vars, data)


def test_bench_codec_runs_tiny():
  results = bench_codec.run(64, 64, kinds=("hyperprior", "context"), repeats=1,
                            model_kwargs=TINY, verbose=False)
  assert [r["entropy_model"] for r in results] == ["hyperprior", "context"]
  for r in results:
    json.dumps(r)
    assert {"entropy_model", "encode_ms", "decode_ms", "height", "width",
            "backend"} <= set(r)
    assert r["encode_ms"] > 0 and r["decode_ms"] > 0
    assert (r["height"], r["width"], r["backend"]) == (64, 64, "cpu")


def test_layered_file_base_decodes_alone(random_variables):
  # DepthBase + Enhancement (smoke widths): the paper's scalable file
  kw = dict(latent_channels=8, widths=(4, 6, 8), analysis_blocks=1,
            task_blocks=1, recon_blocks=1)
  base = models.DepthBase(hyper_channels=4, **kw)
  enh = models.Enhancement(side_channels=8, **kw)
  x = jnp.asarray(bench_codec.smooth_image(40, 72, seed=4))
  base_vars = random_variables(base, x)
  y_base = ops.ste_round(files._programs(base)[0](base_vars, x))
  enh_vars = random_variables(enh, x, y_base, seed=1)
  data = files.compress_layers(base, base_vars, x, enh, enh_vars)
  assert files.compress_layers(base, base_vars, x, enh, enh_vars) == data
  header, streams = bitstream.unpack(data)
  assert list(streams) == ["base", "enhancement"]
  full = files.decompress_layers(base, base_vars, data, enh, enh_vars)
  np.testing.assert_array_equal(full["y_base"], y_base)
  y_enh = ops.ste_round(files._programs(enh)[0](enh_vars, x))
  np.testing.assert_array_equal(full["y_enhancement"], y_enh)
  assert full["disparity"].shape == (1, 40, 72)
  assert full["x_rec"].shape == (1, 40, 72, 3)
  assert full["x_hat"].shape == (1, 20, 36, 3)
  # the base alone: without the enhancement model, or from a base-only file
  alone = files.decompress_layers(base, base_vars, data)
  assert "y_enhancement" not in alone
  np.testing.assert_array_equal(alone["y_base"], y_base)
  base_only = bitstream.pack({"base": streams["base"]}, header.fingerprint,
                             (40, 72))
  np.testing.assert_array_equal(
      files.decompress_layers(base, base_vars, base_only, enh,
                               enh_vars)["disparity"], full["disparity"])
  other = jax.tree_util.tree_map(lambda a: a + 1e-3, enh_vars)
  with pytest.raises(BitstreamError, match="enhancement model"):
    files.decompress_layers(base, base_vars, data, enh, other)
  # the enhancement really uses the base: decoding it with zeros fails
  enh_streams = bitstream.split_streams(streams["enhancement"][8:])
  with pytest.raises(BitstreamError):
    files.decode_layer(enh, enh_vars, enh_streams, (40, 72),
                       side=jnp.zeros_like(y_base))
