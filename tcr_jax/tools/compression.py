"""Image files in, .tcr files out, with the models of a training workdir.

  tcr-jax compress   --workdir W --input IMAGE --output FILE.tcr [--checkpoint NAME]
  tcr-jax decompress --workdir W --input FILE.tcr --output-dir DIR [--layers base|all]

The base task (tcr_jax/bases/) says what is coded and what a decoded file
gives: a depth workdir codes the image as it is and decodes to
disparity.png and reconstruction.png (segmentation.png); a detection
workdir (configs/detection_recon.py) codes the image resized as the
detector's input and decodes to detections.json (boxes in that image's
pixels) and reconstruction.png. The summary's coded_size is the size coded.

NAME is a stage of W (default: the proposal at the middle alpha):
"enhancement_<method>_alpha<a>" codes the base and the enhancement layer,
"base_<method>_alpha<a>" the base alone. The file holds the base stream
(hyper-latent and latent of the depth base layer) and, optionally, the
enhancement stream, which needs the decoded base to decode.

Input images in other modes (grayscale, RGBA, palette, 16-bit) are converted
to 8-bit RGB as PIL's convert("RGB") does, with a one-line warning.
Nothing is written unless the whole operation succeeds.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

import numpy as np

from tcr_jax import bases, checkpoints
from tcr_jax.codec import bitstream, entropy, files
from tcr_jax.errors import UserError

MIN_SIDE = 32  # one latent cell of the base layer


def _pick(workdir: str, checkpoint: str | None) -> tuple[str, str | None]:
  """(base stage, enhancement stage or None)."""
  stages = checkpoints.finished_stages(workdir)
  usable = [s for s in stages if not s.startswith("enhancement_standalone")]
  if not usable:
    raise UserError(f"no finished models in {workdir}/stages")
  if checkpoint is None:
    enh = [s for s in usable if s.startswith("enhancement_proposal_")] or \
          [s for s in usable if s.startswith("enhancement_")]
    if enh:
      alpha = lambda s: float(s.rsplit("alpha", 1)[1])
      enh.sort(key=alpha)
      checkpoint = enh[len(enh) // 2]
    else:
      checkpoint = usable[0]
  if checkpoint not in usable:
    raise UserError(f"no finished model {checkpoint!r} in {workdir}; "
                    f"choose one of: {', '.join(usable)}")
  m = re.fullmatch(r"(base|enhancement)_(baseline|proposal)_alpha(.+)", checkpoint)
  if not m:
    raise UserError(f"cannot use {checkpoint!r}: the standalone enhancement has no base")
  base = f"base_{m.group(2)}_alpha{m.group(3)}"
  if base not in stages:
    raise UserError(f"the base {base!r} of {checkpoint!r} is not finished")
  return base, (checkpoint if m.group(1) == "enhancement" else None)


def _restore(workdir: str, stage: str, model, *sample_args) -> dict:
  """The stage's result (its best checkpoint), shaped by an abstract init."""
  import jax
  abstract = jax.eval_shape(model.init, jax.random.key(0), *sample_args)
  abstract.setdefault("batch_stats", {})
  return checkpoints.load_variables(os.path.join(workdir, "stages", stage),
                                    abstract)


def load_models(workdir: str, checkpoint: str | None = None):
  """(config, (base model, variables), (enhancement model, variables) | None,
  (base stage, enhancement stage or None))."""
  import jax.numpy as jnp
  config = checkpoints.workdir_config(workdir)
  base_stage, enh_stage = _pick(workdir, checkpoint)
  task = bases.for_config(config)
  base = task.base_model()
  x = jnp.zeros((1, 64, 64, 3))
  base_vars = _restore(workdir, base_stage, base, x)
  enh = None
  if enh_stage:
    model = task.enhancement_model()
    y_b = jnp.zeros(base.latent_shape(64, 64))
    enh = (model, _restore(workdir, enh_stage, model, x, y_b))
  return config, (base, base_vars), enh, (base_stage, enh_stage)


def read_image(path: str) -> np.ndarray:
  """8-bit RGB (H, W, 3); other modes converted with a one-line warning."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file")
  try:
    with Image.open(path) as img:
      img.load()
      mode = img.mode
      if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / scale * 255).round().astype(np.uint8)).convert("RGB")
      elif mode != "RGB":
        img = img.convert("RGB")
      rgb = np.asarray(img, np.uint8)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None
  if mode != "RGB":
    print(f"warning: {path}: converted {mode} to 8-bit RGB", file=sys.stderr)
  if rgb.shape[0] < MIN_SIDE or rgb.shape[1] < MIN_SIDE:
    raise UserError(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} is smaller than one "
                    f"latent cell ({MIN_SIDE}x{MIN_SIDE} pixels)")
  return rgb


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tcr-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what users expect
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _stream_bits(data: bytes, fingerprint: bytes) -> dict[str, int]:
  _, streams = bitstream.unpack(data, fingerprint)
  base = bitstream.split_streams(streams["base"])
  bits = {"hyper": 8 * len(base.get("hyper", b"")), "base": 8 * len(base["y"])}
  if not base.get("hyper"):
    bits.pop("hyper")
  if "enhancement" in streams:
    bits["enhancement"] = 8 * (len(streams["enhancement"]) - 8)  # less its fingerprint
  return bits


def _estimated_bits(base, enh, rgb) -> dict[str, float]:
  """The entropy models' estimates, in bits, per stream."""
  import jax.numpy as jnp
  bmodel, bvars = base
  x = jnp.asarray(rgb[None], jnp.float32) / 255.0
  y_b, lik = bmodel.apply(bvars, x, method="encode")
  est = {}
  if "z" in lik:
    est["hyper"] = float(entropy.bits(lik["z"])[0])
  est["base"] = float(entropy.bits(lik["y"])[0])
  if enh is not None:
    emodel, evars = enh
    _, lik_e = emodel.apply(evars, x, y_b, method="encode")
    est["enhancement"] = float(entropy.bits(lik_e)[0])
  return {k: round(v, 1) for k, v in est.items()}


def compress_file(workdir: str, input_path: str, output: str,
                  checkpoint: str | None = None) -> dict:
  checkpoints.workdir_config(workdir), _pick(workdir, checkpoint)  # cheap checks first
  rgb = read_image(input_path)
  config, base, enh, stages = load_models(workdir, checkpoint)
  rgb = bases.for_config(config).coded_input(rgb)  # e.g. the detector's size
  data = files.compress_layers(base[0], base[1], rgb,
                               *(enh if enh is not None else (None, None)))
  fp = files.model_fingerprint(*base)
  summary = {"bytes": len(data), "bits": _stream_bits(data, fp),
             "estimated_bits": _estimated_bits(base, enh, rgb),
             "model": "+".join(s for s in stages if s),
             "coded_size": list(rgb.shape[:2])}
  _atomic_write(output, data)
  return summary


def decompress_file(workdir: str, input_path: str, output_dir: str,
                    layers: str = "all", checkpoint: str | None = None) -> dict:
  if layers not in ("base", "all"):
    raise UserError(f"--layers must be base or all, not {layers!r}")
  if not os.path.isfile(input_path):
    raise UserError(f"{input_path}: no such file")
  with open(input_path, "rb") as f:
    data = f.read()
  config, base, enh, _ = load_models(workdir, checkpoint)
  use_enh = enh if (layers == "all" and enh is not None) else (None, None)
  out = files.decompress_layers(base[0], base[1], data, *use_enh)
  pngs = bases.for_config(config).decoded_files(out)
  fp = files.model_fingerprint(*base)
  summary = {"bytes": len(data), "bits": _stream_bits(data, fp),
             "layers": "all" if "y_enhancement" in out else "base",
             "files": sorted(pngs)}
  os.makedirs(output_dir, exist_ok=True)
  for name, payload in pngs.items():
    _atomic_write(os.path.join(output_dir, name), payload)
  return summary
