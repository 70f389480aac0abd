"""Codec benchmark: whole-image encode and decode time per entropy model.

`run()` builds the paper-width ImageCodec (latent 192, widths (24, 48, 192),
3 blocks) for each entropy model, gives it initialised parameters rescaled
so that rates are realistic (`realistic_variables`: latents of standard
deviation ~3 and predicted scales matched to them, instead of the
near-zero rates of a fresh initialisation), and times

  encode  compress(): g_a, hyper-latent, parameters, fix lists, range coding,
          container (fingerprint and checksums included)
  decode  decompress(): container checks, range decoding with the
          parameter networks (one pass, two passes, or the wavefront loop),
          g_s

after one untimed warm-up (compilation). One JSON line per model is printed
and returned as a dict: entropy_model, encode_ms, decode_ms (medians over
`repeats`), height, width, backend, plus bits, bpp and symbols.

  python -m tcr_jax.bench.codec --height 256 --width 512 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax.codec import files, latent_coding
from tcr_jax.model import models

PAPER = dict(latent_channels=192, widths=(24, 48, 192), blocks=3)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A smooth random RGB image in [0, 1] with some texture, (1, H, W, 3)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width),
                       indexing="ij")
  image = np.full((height, width, 3), 0.5)
  for _ in range(8):
    f = rng.uniform(0.5, 12, 2)
    phase = rng.uniform(0, 2 * np.pi, 3)
    amp = rng.uniform(0.03, 0.12, 3)
    image += amp * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx)[..., None] + phase)
  image += rng.normal(0, 0.03, image.shape)
  return np.clip(image, 0, 1)[None].astype(np.float32)


def _last_conv(tree: dict) -> str:
  convs = sorted((k for k in tree if k.startswith("Conv_")),
                 key=lambda k: int(k.split("_")[1]))
  return convs[-1]


def realistic_variables(model: models.ImageCodec, variables, image,
                        latent_std: float = 3.0, variation: float = 0.3,
                        seed: int = 0):
  """Initialised ImageCodec variables rescaled to give realistic rates.

  Scales g_a's last convolution so the latent of `image` has standard
  deviation `latent_std`, and sets the entropy-parameter network's output
  layer so that it predicts, per channel, about the latent's own standard
  deviation (times 0.7..1.4) and mean, each varying from element to element
  by a relative `variation` (the initialised network's own output, rescaled).
  """
  params = jax.tree_util.tree_map(np.array, jax.device_get(variables["params"]))
  y = np.asarray(model.apply(variables, jnp.asarray(image), method="analysis"))
  a = latent_std / max(float(y.std()), 1e-6)
  last = params["g_a"][_last_conv(params["g_a"])]
  last["kernel"] *= a
  last["bias"] *= a
  y = y * a
  c = y.shape[-1]
  out = params["em"]["entropy_parameters"][_last_conv(
      params["em"]["entropy_parameters"])]
  out["bias"][:] = 0.0
  scale, mean = latent_coding.latent_parameters(
      model.entropy_model(), model.entropy_variables({"params": params}), y)
  spread = [np.maximum(np.asarray(v).reshape(-1, c).std(axis=0), 1e-6)
            for v in (scale, mean)]
  std = np.maximum(y.reshape(-1, c).std(axis=0), 0.2)
  target = std * np.random.default_rng(seed).uniform(0.7, 1.4, c)
  out["kernel"][..., :c] *= variation * target / spread[0]
  out["kernel"][..., c:] *= variation * std / spread[1]
  out["bias"][:c] = target
  out["bias"][c:] = y.reshape(-1, c).mean(axis=0)
  return {**variables, "params": jax.tree_util.tree_map(jnp.asarray, params)}


def _median_ms(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1000.0 * (time.perf_counter() - start))
  return statistics.median(times)


def run(height: int = 1024, width: int = 2048,
        kinds: Sequence[str] = ("hyperprior", "checkerboard", "context"),
        repeats: int = 3, model_kwargs: dict[str, Any] | None = None,
        seed: int = 0, verbose: bool = True) -> list[dict]:
  """Times compress/decompress per entropy model; one dict per model.

  `model_kwargs` overrides the paper widths (tests use tiny ones).
  """
  kwargs = dict(PAPER, **(model_kwargs or {}))
  image = smooth_image(height, width, seed)
  results = []
  for kind in kinds:
    model = models.ImageCodec(entropy_model_name=kind, **kwargs)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))
    variables = realistic_variables(model, variables, image, seed=seed)
    data, info = files.encode_image(model, variables, image)  # warm-up
    x_hat, _ = files.decompress(model, variables, data)
    encode_ms = _median_ms(lambda: files.compress(model, variables, image),
                           repeats)
    decode_ms = _median_ms(lambda: files.decompress(model, variables, data)[0],
                           repeats)
    result = {
        "entropy_model": kind, "encode_ms": round(encode_ms, 1),
        "decode_ms": round(decode_ms, 1), "height": height, "width": width,
        "backend": jax.default_backend(), "bits": 8 * len(data),
        "bpp": round(8 * len(data) / (height * width), 4),
        "symbols": info["symbols"],
        "side_bits": round(info["side_bits"], 1),
        "listed": info["listed"]["scale"] + info["listed"]["centre"]}
    if verbose:
      print(json.dumps(result), flush=True)
    results.append(result)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--height", type=int, default=1024)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--kinds", default="hyperprior,checkerboard,context")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  run(args.height, args.width, tuple(args.kinds.split(",")), args.repeats)


if __name__ == "__main__":
  main()
