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


# ---------------------------------------------------------------- fake Cityscapes
# Tiny zips in the official layout (leftImg8bit, gtFine, disparity), for the
# tfds builder, prepare-data and the data loader.

import io  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


_FRAMES = {"train": [("aachen", "000000", "000019"), ("aachen", "000001", "000019"),
                    ("bochum", "000000", "000313")],
          "val": [("frankfurt", "000000", "000294"), ("lindau", "000000", "000019")]}
_LABEL_IDS = np.array([0, 1, 4, 7, 8, 11, 17, 24, 26, 29, 33], np.uint8)


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  if array.dtype == np.uint16:
    Image.fromarray(array.astype(np.uint16)).save(buf, format="PNG")
  else:
    Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _cityscapes_sample(split: str, key, h: int = 32, w: int = 64) -> dict:
  """Deterministic source arrays for one frame."""
  rng = np.random.default_rng(abs(hash((split,) + key)) % 2**32)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  label_ids = rng.choice(_LABEL_IDS, size=(h, w)).astype(np.uint8)
  disparity = rng.integers(1, 30000, (h, w)).astype(np.uint16)
  disparity[: h // 4] = 0  # no ground truth in the top rows (sky)
  return {"image": image, "label_ids": label_ids, "disparity": disparity}


def _write_cityscapes_zips(root, frames=None, h: int = 32, w: int = 64,
               drop_disparity: int = 0) -> dict:
  """The three official zips under root; returns the source arrays."""
  frames = _FRAMES if frames is None else frames
  os.makedirs(root, exist_ok=True)
  src = {}
  from tcr_jax.data import cityscapes
  with zipfile.ZipFile(os.path.join(root, cityscapes.ZIPS["image"]), "w") as zi, \
       zipfile.ZipFile(os.path.join(root, cityscapes.ZIPS["labels"]), "w") as zl, \
       zipfile.ZipFile(os.path.join(root, cityscapes.ZIPS["disparity"]), "w") as zd:
    zi.writestr("README", "fake")
    for split, keys in frames.items():
      for n, key in enumerate(keys):
        city, stem = key[0], "_".join(key)
        s = _cityscapes_sample(split, key, h, w)
        src[stem] = s
        zi.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
                    _png(s["image"]))
        base = f"gtFine/{split}/{city}/{stem}_gtFine"
        zl.writestr(f"{base}_labelIds.png", _png(s["label_ids"]))
        zl.writestr(f"{base}_color.png", _png(s["image"]))
        zl.writestr(f"{base}_polygons.json", "{}")
        if n >= drop_disparity:
          zd.writestr(f"disparity/{split}/{city}/{stem}_disparity.png",
                      _png(s["disparity"]))
  return src


class FAKE_CITYSCAPES:  # noqa: N801 (a namespace)
  H, W = 32, 64
  FRAMES = _FRAMES
  sample = staticmethod(_cityscapes_sample)
  write_zips = staticmethod(_write_cityscapes_zips)
