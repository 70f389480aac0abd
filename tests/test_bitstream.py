"""Tests of the container: round trip, refusals, and a fuzz of decompress.

TCR_FUZZ_N (default 1000) sets the number of mutated files the fuzz test
decodes, e.g. `TCR_FUZZ_N=10000 pytest tests/test_bitstream.py -k fuzz`.
"""
import os
import struct
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax.bench import codec as bench_codec
from tcr_jax.codec import bitstream, files
from tcr_jax.codec.bitstream import BitstreamError
from tcr_jax.errors import UserError
from tcr_jax.model import models

FP = bytes(range(8))
TINY = dict(latent_channels=8, widths=(4, 6, 8), blocks=1, hyper_channels=4)


def _file(streams=None, fingerprint=FP, size=(37, 61)):
  streams = streams or {"hyper": b"\x01\x02\x03\x04", "y": bytes(range(40))}
  return bitstream.pack(streams, fingerprint, size)


def _forge(fields, streams=(("y", b"abcd"),)):
  """A container with arbitrary header fields and a valid header CRC."""
  magic, version, n, fp, h, w = fields
  header = struct.pack("<4sBB8sII", magic, version, n, fp, h, w)
  payload = b""
  for name, data in streams:
    header += bytes([len(name)]) + name.encode() + struct.pack(
        "<II", len(data) if isinstance(data, bytes) else data,
        zlib.crc32(data) if isinstance(data, bytes) else 0)
    payload += data if isinstance(data, bytes) else b""
  return header + struct.pack("<I", zlib.crc32(header)) + payload


def test_round_trip():
  streams = {"hyper": b"\x01\x02\x03\x04", "y": bytes(range(40)), "e.x-1": b""}
  data = bitstream.pack(streams, FP, (37, 61))
  header, out = bitstream.unpack(data, FP, required=("y",))
  assert out == streams and list(out) == list(streams)
  assert (header.height, header.width, header.version) == (37, 61, 1)
  assert header.fingerprint == FP
  assert header.stream_lengths == {"hyper": 4, "y": 40, "e.x-1": 0}
  assert header.header_bytes == len(data) - 44
  assert bitstream.unpack(memoryview(data))[1] == streams  # no fingerprint check


def test_bitstream_error_is_a_user_error():
  assert issubclass(BitstreamError, UserError)


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"TC", "magic"),
    (b"PK\x03\x04" + bytes(40), "magic"),
    (b"TCRJ", "truncated"),
    (b"TCRJ\x01\x01", "truncated"),
])
def test_refuses_short_and_foreign_files(data, message):
  with pytest.raises(BitstreamError, match=message):
    bitstream.unpack(data, FP)


def test_refusals_say_why():
  data = _file()
  with pytest.raises(BitstreamError, match="format version 2 is not supported"):
    bitstream.unpack(data[:4] + b"\x02" + data[5:], FP)
  with pytest.raises(BitstreamError, match="different model"):
    bitstream.unpack(data, bytes(8))
  with pytest.raises(BitstreamError, match="truncated"):
    bitstream.unpack(data[:-1], FP)
  with pytest.raises(BitstreamError, match="after the last stream"):
    bitstream.unpack(data + b"\0", FP)
  with pytest.raises(BitstreamError, match="corrupt header"):
    bitstream.unpack(data[:10] + bytes([data[10] ^ 4]) + data[11:], FP)
  with pytest.raises(BitstreamError, match="corrupt stream 'y'"):
    bitstream.unpack(data[:-1] + bytes([data[-1] ^ 1]), FP)
  with pytest.raises(BitstreamError, match="lacks stream"):
    bitstream.unpack(data, FP, required=("enhancement",))
  with pytest.raises(BitstreamError, match="expected bytes"):
    bitstream.unpack("TCRJ", FP)


def test_forged_sizes_are_refused_before_use():
  # valid header CRCs, absurd fields: refused without allocating anything
  ok = (b"TCRJ", 1, 1, FP, 64, 64)
  bitstream.unpack(_forge(ok), FP)
  with pytest.raises(BitstreamError, match="image size"):
    bitstream.unpack(_forge((b"TCRJ", 1, 1, FP, 2 ** 31, 2 ** 31)), FP)
  with pytest.raises(BitstreamError, match="image size"):
    bitstream.unpack(_forge((b"TCRJ", 1, 1, FP, 0, 5)), FP)
  with pytest.raises(BitstreamError, match="image size"):
    bitstream.unpack(_forge((b"TCRJ", 1, 1, FP, 30000, 30000)), FP)
  with pytest.raises(BitstreamError, match="truncated"):
    bitstream.unpack(_forge(ok, (("y", 2 ** 32 - 1),)), FP)
  with pytest.raises(BitstreamError, match="streams"):
    bitstream.unpack(_forge((b"TCRJ", 1, 200, FP, 64, 64)), FP)
  with pytest.raises(BitstreamError, match="duplicate"):
    bitstream.unpack(_forge(ok[:2] + (2,) + ok[3:], (("y", b"a"), ("y", b"b"))))


def test_pack_validates_its_arguments():
  with pytest.raises(ValueError, match="name"):
    bitstream.pack({"Y": b""}, FP, (1, 1))
  with pytest.raises(ValueError, match="name"):
    bitstream.pack({"x" * 40: b""}, FP, (1, 1))
  with pytest.raises(ValueError, match="fingerprint"):
    bitstream.pack({"y": b""}, b"short", (1, 1))
  with pytest.raises(ValueError, match="image size"):
    bitstream.pack({"y": b""}, FP, (0, 1))
  with pytest.raises(ValueError, match="streams"):
    bitstream.pack({}, FP, (1, 1))


def test_fingerprint_tracks_structure_values_and_config():
  v = {"params": {"a": jnp.ones((2, 3)), "b": {"c": jnp.zeros(4)}}}
  fp = bitstream.fingerprint(v, "cfg")
  assert len(fp) == 8 and fp == bitstream.fingerprint(v, "cfg")
  assert fp != bitstream.fingerprint(v, "cfg2")
  assert fp != bitstream.fingerprint(
      {"params": {"a": jnp.ones((3, 2)), "b": {"c": jnp.zeros(4)}}}, "cfg")
  assert fp != bitstream.fingerprint(
      {"params": {"a": jnp.ones((2, 3)), "b": {"c": jnp.full(4, 1e-7)}}}, "cfg")


def test_a_renamed_field_keeps_the_files_written_before():
  """DepthBase.depth_bn_momentum was head_bn_momentum when files were first
  written: the fingerprint names it as then, and still tracks its value."""
  text = files.config_string(models.DepthBase())
  assert "head_bn_momentum=0.01" in text and "depth_bn_momentum" not in text
  assert files.config_string(models.DepthBase(depth_bn_momentum=0.1)) != text


def test_varints_and_nested_streams():
  for value in (0, 1, 127, 128, 300, 2 ** 32 - 1):
    raw = bitstream.write_varint(value)
    assert bitstream.read_varint(raw + b"x", 0) == (value, len(raw))
  nested = {"hyper": b"abc", "y": bytes(300)}
  joined = bitstream.join_streams(nested)
  assert bitstream.split_streams(joined) == nested
  rng = np.random.default_rng(0)
  for _ in range(300):
    cut = joined[:rng.integers(0, len(joined))] + rng.bytes(rng.integers(0, 3))
    try:
      out = bitstream.split_streams(cut)
    except BitstreamError:
      continue
    # what parses is a canonical encoding of what it parsed to
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in out.items())
    assert bitstream.join_streams(out) == cut


# ---------------------------------------------------------------- fuzz

@pytest.fixture(scope="module")
def small_file():
  model = models.ImageCodec(entropy_model_name="hyperprior", **TINY)
  image = bench_codec.smooth_image(32, 48, seed=3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 48, 3)))
  variables = bench_codec.realistic_variables(model, variables, image)
  data = files.compress(model, variables, image)
  x_hat, _ = files.decompress(model, variables, data)  # valid, and compiled
  assert x_hat.shape == (1, 32, 48, 3)
  return model, variables, data


def _mutations(data: bytes, n: int, seed: int = 0):
  """n mutated copies of data: bit flips, byte changes, truncations,
  insertions, deletions, random files, and field-targeted edits."""
  rng = np.random.default_rng(seed)
  kinds = ("flip", "flips", "byte", "truncate", "insert", "delete", "random",
           "magic", "version", "fingerprint", "size", "length", "append")
  for i in range(n):
    kind = kinds[i % len(kinds)]
    b = bytearray(data)
    if kind == "flip":
      pos = rng.integers(len(b) * 8)
      b[pos // 8] ^= 1 << (pos % 8)
    elif kind == "flips":
      for pos in rng.integers(len(b) * 8, size=rng.integers(2, 9)):
        b[pos // 8] ^= 1 << (pos % 8)
    elif kind == "byte":
      pos = rng.integers(len(b))
      b[pos] = (b[pos] + rng.integers(1, 256)) % 256
    elif kind == "truncate":
      b = b[:rng.integers(len(b))]
    elif kind == "insert":
      pos = rng.integers(len(b) + 1)
      b[pos:pos] = rng.bytes(rng.integers(1, 9))
    elif kind == "delete":
      pos = rng.integers(len(b))
      del b[pos:pos + rng.integers(1, 9)]
    elif kind == "random":
      b = bytearray(rng.bytes(rng.integers(0, 2 * len(data))))
      if rng.random() < 0.5 and len(b) >= 5:
        b[:5] = data[:5]  # random bytes behind a valid magic and version
    elif kind == "magic":
      b[rng.integers(4)] ^= 1 << rng.integers(8)
    elif kind == "version":
      b[4] = (b[4] + rng.integers(1, 256)) % 256
    elif kind == "fingerprint":
      b[6 + rng.integers(8)] ^= 1 << rng.integers(8)
    elif kind == "size":
      b[14 + rng.integers(8)] ^= 1 << rng.integers(8)
    elif kind == "length":
      b[23 + rng.integers(14)] ^= 1 << rng.integers(8)
    elif kind == "append":
      b += rng.bytes(rng.integers(1, 5))
    yield kind, bytes(b)


@pytest.mark.slow
def test_fuzz_decompress_raises_only_bitstream_errors(small_file):
  model, variables, data = small_file
  n = int(os.environ.get("TCR_FUZZ_N", "1000"))
  counts = {}
  start = time.perf_counter()
  for kind, mutated in _mutations(data, n):
    if mutated == data:
      continue
    try:
      files.decompress(model, variables, mutated)
    except BitstreamError as e:
      message = str(e)
      assert message and "\n" not in message
      counts[kind] = counts.get(kind, 0) + 1
    else:
      pytest.fail(f"{kind} mutation decoded without an error")
  elapsed = time.perf_counter() - start
  assert sum(counts.values()) >= 0.99 * n
  print(f"fuzz: {sum(counts.values())} mutated files, all refused with "
        f"BitstreamError in {elapsed:.1f} s: {counts}")


def test_fingerprint_and_version_refusals_from_decompress(small_file):
  model, variables, data = small_file
  header, streams = bitstream.unpack(data)
  other = bitstream.pack(streams, bytes(8), (header.height, header.width))
  with pytest.raises(BitstreamError, match="different model"):
    files.decompress(model, variables, other)
  with pytest.raises(BitstreamError, match="version"):
    files.decompress(model, variables, data[:4] + b"\x07" + data[5:])
  missing = bitstream.pack({"y": streams["y"]}, header.fingerprint,
                           (header.height, header.width))
  with pytest.raises(BitstreamError, match="lacks stream"):
    files.decompress(model, variables, missing)
