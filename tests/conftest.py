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


# The test files that take longest (seconds of one worker, a fresh clone's
# `make test` on two cores, 2026-12-07), first. `make test` runs the files on
# two pytest-xdist workers in the order collected (--dist loadfile
# --no-loadscope-reorder): longest first, no worker ends the run alone on a
# long file while the other idles. test_train.py's :smoke sweep compiles the
# programs that the notebooks and the sweeps of later files load from the
# persistent cache. The rest follow in their usual order.
LONGEST_FIRST = (
    "test_train.py",                 # 420
    "test_detection_experiment.py",  # 300
    "test_notebooks.py",             # 320
    "test_demo.py",                  # 145
    "test_codec.py",                 # 100
    "test_coding.py",                # 90
    "test_toy_base.py",              # 80
    "test_compression.py",           # 80
    "test_detection.py",             # 80
    "test_ceiling.py",               # 72
    "test_objectives.py",            # 68
    "test_parity_torchvision.py",    # 57
    "test_bench.py",                 # 50
    "test_tasks.py",                 # 48
    "test_detection_parity.py",      # 47
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


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


# ---------------------------------------------------------------- kill / resume


def run_killed_then_resumed(cmd, cwd, kill_when_exists: str,
                            timeout: float = 900):
  """Runs `cmd`, SIGKILLs it as soon as the path `kill_when_exists` appears
  (a checkpoint in the middle of a stage), runs it again to the end, and
  returns the second run (subprocess.CompletedProcess, text output)."""
  import signal
  import subprocess
  import sys
  import time
  env = dict(os.environ, PYTHONPATH=cwd)
  cmd = [sys.executable, "-m", "tcr_jax.main", *cmd]
  release_memory()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while (not os.path.isdir(kill_when_exists) and proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(kill_when_exists), "the run ended before it could be interrupted"
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def assert_resumed_mid_stage(stdout: str, stage: str, steps: int) -> None:
  """The run resumed `stage` from a checkpoint before its last step (a kill
  that landed after the stage's end would test nothing)."""
  import re
  found = re.findall(rf"\[{re.escape(stage)}\] resuming at step (\d+)", stdout)
  assert found, f"{stage} did not resume"
  assert 0 < int(found[0]) < steps, f"{stage} resumed at step {found[0]} of {steps}"


def assert_same_records(resumed: list[dict], records: list[dict]) -> None:
  """results.json records equal up to float noise (rel 1e-5)."""
  assert len(resumed) == len(records)
  for a, b in zip(resumed, records):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
      else:
        assert a[k] == b[k], (k, a, b)


# ---------------------------------------------------------------- fake COCO
# The three 2017 archives with a few JPEGs of both orientations: crowd
# boxes, a degenerate box, an image without annotations and one whose
# annotated area is below the authors' 1000 (both filtered out).


def _jpeg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


# (height, width, [(x, y, w, h, category_id, iscrowd, area)])
_COCO_IMAGES = {
    "train": {
        11: (60, 80, [(5, 6, 30, 20, 1, 0, 500.0), (40, 10, 30, 40, 3, 0, 900.0)]),
        12: (80, 60, [(10, 10, 40, 50, 18, 0, 1500.0), (0, 0, 60, 30, 1, 1, 900.0)]),
        13: (64, 96, [(20, 20, 50, 30, 62, 0, 1400.0), (2, 2, 0.5, 10, 3, 0, 5.0)]),
        14: (72, 48, [(4, 4, 30, 50, 44, 0, 1200.0)]),
        15: (50, 50, []),                                   # no annotations
        16: (70, 90, [(1, 1, 20, 20, 1, 0, 300.0)]),        # area 300 <= 1000
    },
    "validation": {
        21: (60, 90, [(10, 10, 40, 30, 1, 0, 1100.0), (50, 20, 30, 30, 3, 1, 800.0)]),
        22: (90, 60, [(5, 5, 30, 60, 3, 0, 1600.0)]),
        23: (64, 64, [(8, 8, 40, 40, 90, 0, 1500.0)]),
    },
}


def _write_coco_zips(root, drop: tuple[str, ...] = ()) -> dict:
  """train2017.zip, val2017.zip and annotations_trainval2017.zip under
  root (less the names in `drop`); returns the source images by id."""
  import json as _json
  os.makedirs(root, exist_ok=True)
  folders = {"train": "train2017", "validation": "val2017"}
  images, annotations = {}, {"train": None, "validation": None}
  next_ann = 1
  for split, entries in _COCO_IMAGES.items():
    folder = folders[split]
    infos, anns = [], []
    if f"{folder}.zip" not in drop:
      zf = zipfile.ZipFile(os.path.join(root, f"{folder}.zip"), "w")
    for image_id, (h, w, objects) in entries.items():
      rng = np.random.default_rng(image_id)
      img = (rng.integers(60, 200, (h, w, 3))).astype(np.uint8)
      name = f"{image_id:012d}.jpg"
      data = _jpeg(img)
      images[image_id] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
      if f"{folder}.zip" not in drop:
        zf.writestr(f"{folder}/{name}", data)
      infos.append({"id": image_id, "file_name": name, "height": h, "width": w})
      for x, y, bw, bh, cat, crowd, area in objects:
        anns.append({"id": next_ann, "image_id": image_id, "category_id": cat,
                     "bbox": [x, y, bw, bh], "iscrowd": crowd, "area": area,
                     "segmentation": []})
        next_ann += 1
    if f"{folder}.zip" not in drop:
      zf.close()
    annotations[split] = {"images": infos, "annotations": anns,
                          "categories": [{"id": i, "name": str(i)}
                                         for i in range(1, 91)]}
  if "annotations_trainval2017.zip" not in drop:
    with zipfile.ZipFile(os.path.join(root, "annotations_trainval2017.zip"),
                         "w") as zf:
      for split, folder in folders.items():
        zf.writestr(f"annotations/instances_{folder}.json",
                    _json.dumps(annotations[split]))
  return images


class FAKE_COCO:  # noqa: N801 (a namespace)
  IMAGES = _COCO_IMAGES
  write_zips = staticmethod(_write_coco_zips)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """Each test file's compiled programs go when it ends: `make test` runs
  two workers on a 24 GiB machine, and a worker otherwise keeps every
  program it ever compiled (the disk cache above keeps them for reuse)."""
  yield
  release_memory()


def release_memory() -> None:
  """Drops this process's compiled programs and hands the freed memory back
  to the system (glibc keeps it otherwise: 3.3 of 4.3 GB after a detection
  :smoke sweep), so that a process the test starts next has room."""
  import ctypes
  import gc
  import sys
  if "jax" in sys.modules:
    sys.modules["jax"].clear_caches()
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass
