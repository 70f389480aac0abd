"""Image files: a model's latents, range-coded, in the .tcr container.

Every model of tcr_jax.model.models offers analysis / outputs / entropy_model /
entropy_variables / latent_shape; the functions here call those, so a file
is coded exactly as the model computes.

  encode_layer(model, variables, image, side)   -> (streams, info): one layer
  compress(model, variables, image)             -> bytes: an ImageCodec file
  decompress(model, variables, data)            -> (x_hat, info)
  compress_layers(base, vars, image, enh, vars) -> bytes: the paper's layered
  decompress_layers(base, vars, data, enh, vars)   file, "base" (decodes
                                                   alone) + "enhancement"

Files are deterministic (same input, model and variables: same bytes) and
carry a fingerprint of the model, checked before any model computation;
malformed or foreign files raise bitstream.BitstreamError.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax.codec import bitstream
from tcr_jax.codec.bitstream import BitstreamError
from tcr_jax.codec.latent_coding import decode_latent, encode_latent
from tcr_jax.codec.tables import DEFAULT_TOL


def config_string(model) -> str:
  """The module's dataclass fields, for the fingerprint. Fields a model
  lists in `fingerprint_omits_defaults` (added after files were written)
  count only when they differ from their default, and fields renamed since
  count under the name in `fingerprint_names` (new name -> old), so older
  files keep their fingerprint."""
  omit = getattr(model, "fingerprint_omits_defaults", ())
  names = getattr(model, "fingerprint_names", {})
  fields = [f"{names.get(f.name, f.name)}={getattr(model, f.name)!r}"
            for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")
            and not (f.name in omit and getattr(model, f.name) == f.default)]
  return f"{type(model).__name__}({', '.join(fields)})"


def model_fingerprint(model, variables) -> bytes:
  return bitstream.fingerprint(variables, config_string(model))


def as_image(image) -> jax.Array:
  """One RGB image, uint8 or float in [0, 1], (H, W, 3) or (1, H, W, 3)."""
  x = np.asarray(image)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
    raise ValueError(f"expected one RGB image (H, W, 3) or (1, H, W, 3), "
                     f"got shape {x.shape}")
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  return jnp.asarray(x, jnp.float32)


@functools.lru_cache(maxsize=16)
def _programs(model):
  """The model's own analysis and outputs, jitted (modules are hashable)."""
  analysis = jax.jit(lambda v, x: model.apply(v, x, method="analysis"))
  outputs = jax.jit(lambda v, y_hat, size: model.apply(v, y_hat, size,
                                                       method="outputs"),
                    static_argnums=2)
  return analysis, outputs


def encode_layer(model, variables, image, side=None, *,
                 tol: float = DEFAULT_TOL) -> tuple[dict[str, bytes], dict]:
  """Codes one layer's latent of `image`; info["y_hat"] is what decodes."""
  x = as_image(image)
  y = _programs(model)[0](variables, x)
  return encode_latent(model.entropy_model(), model.entropy_variables(variables),
                       y, side=side, tol=tol)


def decode_layer(model, variables, streams, size: tuple[int, int], side=None
                 ) -> tuple[jax.Array, dict[str, Any]]:
  """(y_hat, the model's outputs at `size`) from one layer's streams."""
  y_hat = decode_latent(model.entropy_model(), model.entropy_variables(variables),
                        streams, model.latent_shape(*size), side=side)
  return y_hat, _programs(model)[1](variables, y_hat, tuple(size))


# --------------------------------------------------------------------------
# One-layer files (ImageCodec).


def encode_image(model, variables, image, *, tol: float = DEFAULT_TOL
                 ) -> tuple[bytes, dict[str, Any]]:
  """compress, also returning encode_latent's info (plus the file's size)."""
  x = as_image(image)
  streams, info = encode_layer(model, variables, x, tol=tol)
  data = bitstream.pack(streams, model_fingerprint(model, variables),
                        x.shape[1:3])
  info["file_bits"] = 8 * len(data)
  info["header_bits"] = 8 * (len(data) - sum(len(s) for s in streams.values()))
  return data, info


def compress(model, variables, image, *, tol: float = DEFAULT_TOL) -> bytes:
  """One image (uint8 or float in [0, 1], (H, W, 3) or (1, H, W, 3)) to bytes."""
  return encode_image(model, variables, image, tol=tol)[0]


def decompress(model, variables, data: bytes) -> tuple[jax.Array, dict[str, Any]]:
  """Decodes a `compress` file: (x_hat (1, H, W, 3) float, unclipped; info).

  Raises:
    BitstreamError: the file is corrupt, truncated, not ours, or was
      written by another model (checked before any model computation).
  """
  needed = ("hyper", "y") if model.entropy_model().hyperprior else ("y",)
  header, streams = bitstream.unpack(data, model_fingerprint(model, variables),
                                     required=needed)
  size = (header.height, header.width)
  y_hat, out = decode_layer(model, variables, streams, size)
  bits = 8 * len(data)
  return out["x_hat"], {"height": size[0], "width": size[1], "bits": bits,
                        "bpp": bits / (size[0] * size[1]),
                        "stream_bytes": dict(header.stream_lengths),
                        "header_bytes": header.header_bytes, "y_hat": y_hat}


# --------------------------------------------------------------------------
# The paper's layered files: DepthBase ("base") + Enhancement ("enhancement").


def compress_layers(base_model, base_variables, image, enhancement_model=None,
                    enhancement_variables=None, *, tol: float = DEFAULT_TOL
                    ) -> bytes:
  """A layered file: stream "base" and, optionally, "enhancement" (coded
  given the decoded base latent).

  The container's fingerprint is the base model's, so a reader holding only
  the base model decodes the base; the enhancement stream starts with the
  enhancement model's own 8-byte fingerprint.
  """
  x = as_image(image)
  base, info = encode_layer(base_model, base_variables, x, tol=tol)
  streams = {"base": bitstream.join_streams(base)}
  if enhancement_model is not None:
    enh, _ = encode_layer(enhancement_model, enhancement_variables, x,
                          side=info["y_hat"], tol=tol)
    streams["enhancement"] = (model_fingerprint(enhancement_model,
                                                enhancement_variables)
                              + bitstream.join_streams(enh))
  return bitstream.pack(streams, model_fingerprint(base_model, base_variables),
                        x.shape[1:3])


def decompress_layers(base_model, base_variables, data: bytes,
                      enhancement_model=None, enhancement_variables=None
                      ) -> dict[str, Any]:
  """Decodes a `compress_layers` file.

  Always decodes the base: y_base and the base model's outputs (disparity
  (1, H, W), x_rec (1, H, W, 3)). With an enhancement model and an
  "enhancement" stream, also y_enhancement and its outputs (x_hat at half
  resolution, or logits at H x W).

  Raises:
    BitstreamError: corrupt, foreign, or another model's file or stream.
  """
  header, streams = bitstream.unpack(
      data, model_fingerprint(base_model, base_variables), required=("base",))
  size = (header.height, header.width)
  y_base, base_out = decode_layer(base_model, base_variables,
                                  bitstream.split_streams(streams["base"]), size)
  out = {"height": size[0], "width": size[1], "bits": 8 * len(data),
         "stream_bytes": dict(header.stream_lengths), "y_base": y_base,
         **base_out}
  if enhancement_model is None or "enhancement" not in streams:
    return out
  payload = streams["enhancement"]
  fp = model_fingerprint(enhancement_model, enhancement_variables)
  if payload[:len(fp)] != fp:
    raise BitstreamError("enhancement stream was written by a different "
                         "enhancement model or configuration")
  y_enh, enh_out = decode_layer(
      enhancement_model, enhancement_variables,
      bitstream.split_streams(payload[len(fp):]), size, side=y_base)
  return {**out, "y_enhancement": y_enh, **enh_out}
