"""A mistyped --config.KEY or a bad value is one line on stderr and exit code
2, from every entry point that takes --config, before anything is written."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "depth_recon.py") + ":synthetic"


def _run(entry: str, overrides: list[str], tmp_path) -> subprocess.CompletedProcess:
  """python -m tcr_jax.ENTRY in an empty tmp_path (its cwd) with the
  overrides; tcr_jax.main gets --workdir=tmp_path/workdir."""
  command = {"main": ["tcr_jax.main", f"--config={CONFIG}", *overrides,
                      f"--workdir={tmp_path / 'workdir'}"],
             "bench": ["tcr_jax.bench", "train-step", f"--config={CONFIG}",
                       "--batch=1", "--height=64", "--width=64", "--steps=1",
                       *overrides]}[entry]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  return subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=60)


def _one_line(result: subprocess.CompletedProcess, entry: str) -> str:
  lines = result.stderr.splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].strip(), result.stderr
  assert lines[0].startswith(f"tcr_jax.{entry}: error: ")
  return lines[0]


@pytest.mark.parametrize("entry", ["main", "bench"])
@pytest.mark.parametrize("flag, bad, close", [
    ("--config.train.base_stesp=3", "train.base_stesp", "train.base_steps"),
    ("--config.trian.enhancement_steps=3", "trian.enhancement_steps",
     "train.enhancement_steps"),
    ("--noconfig.train.finetune_chian", "train.finetune_chian",
     "train.finetune_chain"),
])
def test_mistyped_key_is_one_line_naming_the_closest_keys(entry, flag, bad,
                                                         close, tmp_path):
  line = _one_line(_run(entry, [flag], tmp_path), entry)
  assert f"config has no field {bad!r}" in line
  assert close in line.split("(closest: ", 1)[1]
  assert not (tmp_path / "workdir").exists()
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("entry", ["main", "bench"])
def test_bad_value_is_one_line(entry, tmp_path):
  line = _one_line(_run(entry, ["--config.train.base_steps=abc"], tmp_path),
                   entry)
  assert "'abc'" in line and "train.base_steps" in line
  assert os.listdir(tmp_path) == []


def test_overrides_apply_as_config_flags_applies_them():
  from tcr_jax import config_overrides, configs_lib
  config = config_overrides.apply(
      configs_lib.load_config(CONFIG),
      ["--config.train.base_steps", "7", "--noconfig.train.finetune_chain",
       "--config.sweep.alphas=(0.1, 0.2)"])
  assert config.train.base_steps == 7 and config.train.finetune_chain is False
  assert config.sweep.alphas == (0.1, 0.2)


def test_stage_needs_steps_and_hp():
  from tcr_jax.training import train
  with pytest.raises(TypeError):
    train.Stage("base_0.05", "base")  # pylint: disable=no-value-for-parameter
  with pytest.raises(TypeError):
    train.Stage("base_0.05", "base", 10)  # pylint: disable=no-value-for-parameter
  assert train.Stage("base_0.05", "base", 10, {"alpha": 0.05}).trainable == "all"


def test_the_cli_caches_compiled_programs(tmp_path, monkeypatch):
  """tcr_jax.main keeps JAX's persistent compilation cache under
  $XDG_CACHE_HOME/tcr_jax/jax unless JAX_COMPILATION_CACHE_DIR says where."""
  import jax
  from tcr_jax import supervisor
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    supervisor.use_compilation_cache(jax)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "tcr_jax" / "jax")
    jax.config.update("jax_compilation_cache_dir", before)
    monkeypatch.setenv("TCR_JAX_COMPILATION_CACHE", "0")
    supervisor.use_compilation_cache(jax)
    assert jax.config.jax_compilation_cache_dir == before
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_alphas_that_are_not_numbers_are_one_line(tmp_path):
  # absl turns "abc" into the tuple ('abc',): valid as a flag, not as alphas.
  line = _one_line(_run("main", ["--config.sweep.alphas=abc"], tmp_path), "main")
  assert "config.sweep.alphas=('abc',)" in line and "positive numbers" in line
  assert os.listdir(tmp_path) == []


def test_a_missing_config_file_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  result = subprocess.run(
      [sys.executable, "-m", "tcr_jax.main", "--config=configs/nope.py:synthetic",
       f"--workdir={tmp_path / 'workdir'}"], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=60)
  assert _one_line(result, "main") == "tcr_jax.main: error: config file 'configs/nope.py' not found"
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("experiment", ["depth_recon", "depth_seg", "detection_recon"])
def test_each_config_file_is_self_contained(experiment):
  """configs/*.py say their variants themselves; the demo's knobs exist in
  the synthetic variants only (the sweep's defaults are no warm starts and
  no references); field names keep one meaning to the layer."""
  from tcr_jax import configs_lib
  path = os.path.join(ROOT, "configs", f"{experiment}.py")
  text = open(path).read()
  assert "def get_config(arg=None)" in text
  for variant in ("smoke", "synthetic", "authors"):
    assert f'arg == "{variant}"' in text or f'"{variant}")' in text
  demo = ("train.base_pretrain_steps", "train.finetune_lr_scale",
          "train.finetune_chain")
  for variant in ("", "authors", "smoke"):
    c = configs_lib.load_config(f"{path}:{variant}" if variant else path)
    configs_lib.validate(c)
    flat = set(_flat(c.to_dict()))
    assert not flat & set(demo), (variant, flat & set(demo))
    assert "eval.reference_train_images" not in flat
    assert ("task.depth_bn_momentum" in flat) == experiment.startswith("depth")
  if experiment.startswith("depth"):
    demo_config = configs_lib.load_config(f"{path}:synthetic")
    assert demo_config.train.base_pretrain_steps > 0 and demo_config.train.finetune_chain


def _flat(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"
