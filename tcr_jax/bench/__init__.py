"""Benchmarks: python -m tcr_jax.bench train-step | codec | detection [options].

train-step times one jitted training step (forward, backward, Adam) of the
base model of --config, with --config.KEY=VALUE overrides as tcr_jax.main
takes them (configs/detection_recon.py: the detection base,
codec + Faster R-CNN, on random images with 8 random boxes each); for the
depth configs the paper's depth base model: half-resolution codec (g_a, entropy model, g_s),
LRASPP MobileNetV3-L depth head and the reconstruction decoder, the same
sub-model as the PyTorch reference benchmark of the authors' code. It prints one JSON line:
images_per_s, step_ms, peak_gib, batch, height, width, backend.

No TensorFlow is imported: this runs on a GPU box with only jax installed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence
from tcr_jax import bases, config_overrides, configs_lib
from tcr_jax.bench import codec as bench_codec
from tcr_jax.bench import detection as bench_detection
from tcr_jax.errors import UserError
from tcr_jax.training import train


def _peak_gib():
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


def train_step(config_spec: str, batch: int, height: int, width: int,
               steps: int = 20, warmup: int = 3, dtype: str | None = None,
               overrides: Sequence[str] = ()) -> dict:
  """Times the base layer's training step, the one training runs
  (tcr_jax.training.train.train_step with the base task's base_loss_fn, L_b), on
  random data (the task's bench_batch);
  overrides: --config.KEY=VALUE flags, as tcr_jax.main takes them."""
  config = config_overrides.apply(configs_lib.load_config(config_spec), overrides)
  import functools
  import jax
  import jax.numpy as jnp
  with config.unlocked():
    if dtype:
      config.model.compute_dtype = dtype
  task = bases.for_config(config)
  model = task.base_model()
  data, init_input = task.bench_batch(batch, height, width)
  variables = jax.jit(model.init)(jax.random.key(3, impl="rbg"), init_input)
  tx = train.optimizer(config, "base", task=task)
  state = train.TrainState(
      step=jnp.int32(0), apply_fn=model.apply, params=variables["params"],
      tx=tx, opt_state=tx.init(variables["params"]),
      batch_stats=variables["batch_stats"], rng=jax.random.PRNGKey(0))
  hp = {"alpha": jnp.float32(1e-3), "beta": jnp.float32(0.01),
        "learning_rate": jnp.float32(config.train.learning_rate)}
  step = jax.jit(functools.partial(
      train.train_step, loss_fn=functools.partial(task.base_loss_fn, model)),
      donate_argnums=0)
  t_compile = time.perf_counter()
  for _ in range(warmup):
    state, metrics = step(state, data, hp, None)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t_compile
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data, hp, None)
  jax.block_until_ready(metrics)
  dt = (time.perf_counter() - t) / steps
  return {"impl": "tcr_jax", "config": " ".join([config_spec, *overrides]),
          "dtype": config.model.compute_dtype,
          "entropy_model": config.entropy_model,
          "images_per_s": round(batch / dt, 2), "step_ms": round(dt * 1e3, 2),
          "peak_gib": _peak_gib(), "batch": batch, "height": height,
          "width": width, "backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind,
          "warmup_s": round(compile_s, 1), "loss": float(metrics["loss"])}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m tcr_jax.bench")
  sub = p.add_subparsers(dest="what", required=True)
  s = sub.add_parser("train-step", help="time a base model's train step (depth or detection)")
  s.add_argument("--config", default="configs/depth_recon.py",
                 help="config file[:variant]; then --config.KEY=VALUE overrides")
  s.add_argument("--batch", type=int, default=10)
  s.add_argument("--height", type=int, default=1024)
  s.add_argument("--width", type=int, default=2048)
  s.add_argument("--steps", type=int, default=20)
  s.add_argument("--warmup", type=int, default=3)
  s.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  s = sub.add_parser("codec", help="time compress/decompress per entropy model")
  s.add_argument("--height", type=int, default=1024)
  s.add_argument("--width", type=int, default=2048)
  s.add_argument("--repeats", type=int, default=3)
  bench_detection.add_arguments(sub.add_parser(
      "detection", help="time Faster R-CNN training and inference vs torchvision"))
  a, overrides = p.parse_known_args(argv)
  if overrides and a.what != "train-step":
    p.error(f"unrecognized arguments: {' '.join(overrides)}")
  try:
    if a.what == "train-step":
      print(json.dumps(train_step(a.config, a.batch, a.height, a.width,
                                  a.steps, a.warmup, dtype=a.dtype,
                                  overrides=overrides)), flush=True)
    elif a.what == "detection":
      for row in bench_detection.run(a):
        print(json.dumps(row), flush=True)
    else:
      for row in bench_codec.run(a.height, a.width, repeats=a.repeats):
        print(json.dumps(row), flush=True)
  except UserError as e:
    print(f"tcr_jax.bench: error: {e}", file=sys.stderr)
    return 2
  return 0

