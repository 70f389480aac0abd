"""Test set-up: CPU only, fake devices for sharding tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Share compiled programs between the tests and the subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ".pytest_cache", "jax"))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(experiment: str, variant: str = ""):
  from tcr_jax import configs_lib
  return configs_lib.load_config(
      os.path.join(ROOT, "configs", f"{experiment}.py")
      + (f":{variant}" if variant else ""))


def make_smoke_config(experiment: str = "depth_recon", **overrides):
  """The :smoke config with one alpha (0.05); overrides as {"a.b": value}."""
  config = load_config(experiment, "smoke")
  config.sweep.alphas = (0.05,)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


@pytest.fixture(scope="session")
def root() -> str:
  """The repository root (where configs/ lives)."""
  return ROOT


@pytest.fixture(scope="session")
def configs():
  """Config loaders: configs.load(experiment, variant), configs.smoke(...)."""
  class Configs:
    load = staticmethod(load_config)
    smoke = staticmethod(make_smoke_config)
  return Configs


def draw_variables(model, *args, seed: int = 0, **kwargs):
  """Variables of the model's shapes, drawn directly instead of by its
  initialisers (LRASPP's init compiles for ~50 s on two cores): kernels
  N(0, 1 / fan_in), batch statistics mean 0 and variance 1."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      return (jnp.ones if "var" in name else jnp.zeros)(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.normal(0, fan_in ** -0.5, s.shape), s.dtype)

  shapes = jax.eval_shape(lambda k: model.init(k, *args, **kwargs),
                          jax.random.key(seed))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def random_variables():
  """draw_variables(model, *init_args, seed=0)."""
  return draw_variables
