"""The tcr_jax container: named, checksummed streams behind a small header.

Every rate tcr_jax reports can be a file size; this is the file. Layout
(all integers little-endian), format version 1:

  offset  size  field
  0       4     magic b"TCRJ"
  4       1     format version (1)
  5       1     number of streams n, 1..MAX_STREAMS
  6       8     fingerprint of the model and its configuration
  14      4     image height (original, before padding), 1..MAX_SIDE
  18      4     image width
  22      ...   n stream entries: name length (1 byte, 1..MAX_NAME), name
                (ASCII [a-z0-9_.-]), payload length (4 bytes), CRC-32 of
                the payload (4 bytes)
  ...     4     CRC-32 of every header byte before it
  ...     ...   the n payloads, back to back, in entry order

Why each field is there:
  * magic and version: a file that is not ours, or written by a later format,
    is refused with a message that says so (and the version is read before
    anything whose layout may change between versions);
  * fingerprint (`fingerprint`): a stream decoded with other weights or
    another configuration decodes into garbage without any error, so the
    writer stores 8 bytes of a SHA-256 over the parameter tree (paths, shapes,
    dtypes, values) and a configuration string, and the reader refuses a
    mismatch;
  * the header CRC and one CRC per payload: a flipped bit or a truncated
    transfer is reported as corruption instead of decoding into garbage. The
    payloads are entropy-coded, so without the check a single flipped bit
    silently changes everything after it.

Parsing (`unpack`) is defensive: it never hangs, never raises anything but
BitstreamError on arbitrary bytes, and validates every length against the
file size, and the image size against MAX_SIDE / MAX_PIXELS, before it uses
them, so a forged length field cannot make it allocate absurd memory. The
whole file is checked (header, fingerprint, every CRC, exact total length)
before any model computation starts.

Small helpers shared with `coding`: LEB128 varints (`write_varint`,
`read_varint`) and `join_streams` / `split_streams`, which nest several named
streams inside one (a scalable layer's "hyper" and "y" inside "base").
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
import zlib
from typing import Any, Mapping

import numpy as np

from tcr_jax.errors import UserError

MAGIC = b"TCRJ"
FORMAT_VERSION = 1
FINGERPRINT_BYTES = 8
MAX_STREAMS = 16
MAX_NAME = 32
MAX_SIDE = 1 << 14
MAX_PIXELS = 1 << 25  # 33.5 Mpx (8192 x 4096); g_s needs ~100 bytes per pixel
_FIXED = struct.Struct("<4sBB8sII")  # magic, version, n, fingerprint, h, w
_ENTRY = struct.Struct("<II")  # payload length, crc32
_NAME_RE = re.compile(rb"[a-z0-9_.\-]+")


class BitstreamError(UserError):
  """A file or stream that tcr_jax cannot decode: corrupt, truncated, foreign."""


@dataclasses.dataclass(frozen=True)
class Header:
  """What `unpack` read from a container header."""
  version: int
  fingerprint: bytes
  height: int
  width: int
  stream_lengths: dict[str, int]
  header_bytes: int


def crc32(data: bytes) -> int:
  return zlib.crc32(data) & 0xFFFFFFFF


def fingerprint(variables: Any, config: str) -> bytes:
  """8-byte identity of a model: SHA-256 over its parameters and a config.

  Hashes, for every leaf of the variable tree in flattening order, its path,
  shape, dtype and values (bytes of the host copy), then `config` (e.g. the
  module's dataclass fields). Two checkpoints of one architecture therefore
  get different fingerprints, which is the point: decoding a stream with the
  wrong weights produces garbage, not an error.
  """
  import jax  # local: keeps this module importable without jax for tools

  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  for path, leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.tobytes())
  h.update(b"\0config\0")
  h.update(config.encode())
  return h.digest()[:FINGERPRINT_BYTES]


def _check_name(name: str) -> bytes:
  raw = name.encode("ascii", errors="replace")
  if not 1 <= len(raw) <= MAX_NAME or not _NAME_RE.fullmatch(raw):
    raise ValueError(f"stream name {name!r} must be 1..{MAX_NAME} characters "
                     "of [a-z0-9_.-]")
  return raw


def check_image_size(height: int, width: int) -> None:
  """Raises BitstreamError unless 1 <= side <= MAX_SIDE, pixels <= MAX_PIXELS."""
  if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
    raise BitstreamError(f"image size {height}x{width} outside 1..{MAX_SIDE} "
                         "per side: corrupt or foreign file")
  if height * width > MAX_PIXELS:
    raise BitstreamError(f"image size {height}x{width} exceeds {MAX_PIXELS} "
                         "pixels: corrupt or foreign file")


def pack(streams: Mapping[str, bytes], fingerprint: bytes,
         image_size: tuple[int, int]) -> bytes:
  """Writes a container holding `streams` (name -> payload), in dict order.

  Raises ValueError on arguments a valid file cannot hold.
  """
  if not 1 <= len(streams) <= MAX_STREAMS:
    raise ValueError(f"a container holds 1..{MAX_STREAMS} streams, "
                     f"got {len(streams)}")
  if len(fingerprint) != FINGERPRINT_BYTES:
    raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
  height, width = (int(v) for v in image_size)
  try:
    check_image_size(height, width)
  except BitstreamError as e:
    raise ValueError(str(e)) from None
  header = bytearray(_FIXED.pack(MAGIC, FORMAT_VERSION, len(streams),
                                 bytes(fingerprint), height, width))
  payloads = []
  for name, payload in streams.items():
    raw = _check_name(name)
    payload = bytes(payload)
    if len(payload) >= 1 << 32:
      raise ValueError(f"stream {name!r} is too long")
    header += bytes([len(raw)]) + raw + _ENTRY.pack(len(payload), crc32(payload))
    payloads.append(payload)
  header += struct.pack("<I", crc32(bytes(header)))
  return bytes(header) + b"".join(payloads)


def _as_bytes(data: Any) -> bytes:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return bytes(data)
  raise BitstreamError(f"expected bytes, got {type(data).__name__}")


def unpack(data: bytes, fingerprint: bytes | None = None,
           required: tuple[str, ...] = ()) -> tuple[Header, dict[str, bytes]]:
  """Parses and verifies a container; returns (header, name -> payload).

  Args:
    data: the file's bytes.
    fingerprint: the reader's model fingerprint; a file written by another
      model is refused. None skips that check (inspection tools).
    required: stream names that must be present.

  Raises:
    BitstreamError, and nothing else, for anything but a valid file.
  """
  data = _as_bytes(data)
  if not data:
    raise BitstreamError("empty file: not a tcr_jax bitstream")
  if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
    raise BitstreamError("not a tcr_jax bitstream (bad magic bytes)")
  if len(data) < len(MAGIC) + 1:
    raise BitstreamError("truncated file: header incomplete")
  version = data[len(MAGIC)]
  if version != FORMAT_VERSION:
    raise BitstreamError(f"bitstream format version {version} is not supported "
                         f"(this reader handles version {FORMAT_VERSION})")
  if len(data) < _FIXED.size:
    raise BitstreamError("truncated file: header incomplete")
  _, _, n, fp, height, width = _FIXED.unpack_from(data, 0)
  if not 1 <= n <= MAX_STREAMS:
    raise BitstreamError(f"corrupt header: {n} streams (1..{MAX_STREAMS})")
  pos = _FIXED.size
  entries = []
  for _ in range(n):
    if pos + 1 > len(data):
      raise BitstreamError("truncated file: header incomplete")
    name_len = data[pos]
    pos += 1
    if not 1 <= name_len <= MAX_NAME or pos + name_len + _ENTRY.size > len(data):
      raise BitstreamError("corrupt or truncated header (stream entry)")
    raw = data[pos:pos + name_len]
    pos += name_len
    if not _NAME_RE.fullmatch(raw):
      raise BitstreamError("corrupt header (stream name)")
    length, crc = _ENTRY.unpack_from(data, pos)
    pos += _ENTRY.size
    entries.append((raw.decode("ascii"), length, crc))
  if pos + 4 > len(data):
    raise BitstreamError("truncated file: header incomplete")
  (header_crc,) = struct.unpack_from("<I", data, pos)
  if crc32(data[:pos]) != header_crc:
    raise BitstreamError("corrupt header (checksum mismatch)")
  pos += 4
  payload_start = pos
  names = [e[0] for e in entries]
  if len(set(names)) != len(names):
    raise BitstreamError("corrupt header (duplicate stream names)")
  if fingerprint is not None and bytes(fingerprint) != fp:
    raise BitstreamError(
        f"bitstream was written by a different model or configuration "
        f"(fingerprint {fp.hex()}, this model {bytes(fingerprint).hex()})")
  check_image_size(height, width)
  total = pos + sum(e[1] for e in entries)
  if total > len(data):
    raise BitstreamError(f"truncated file: {len(data)} bytes, header "
                         f"announces {total}")
  if total < len(data):
    raise BitstreamError(f"corrupt file: {len(data) - total} bytes after the "
                         "last stream")
  streams = {}
  for name, length, crc in entries:
    payload = data[pos:pos + length]
    pos += length
    if crc32(payload) != crc:
      raise BitstreamError(f"corrupt stream {name!r} (checksum mismatch)")
    streams[name] = payload
  missing = [r for r in required if r not in streams]
  if missing:
    raise BitstreamError(f"bitstream lacks stream(s) {', '.join(missing)}")
  header = Header(version, fp, height, width,
                  {e[0]: e[1] for e in entries}, payload_start)
  return header, streams


# --------------------------------------------------------------------------
# Varints and nested streams.


def write_varint(value: int) -> bytes:
  """Unsigned LEB128."""
  if value < 0:
    raise ValueError("varints are unsigned")
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def read_varint(data: bytes, pos: int, max_bytes: int = 5) -> tuple[int, int]:
  """(value, new position); BitstreamError when truncated or too long."""
  value = shift = 0
  for i in range(max_bytes):
    if pos + i >= len(data):
      raise BitstreamError("truncated stream (varint)")
    byte = data[pos + i]
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos + i + 1
  raise BitstreamError("corrupt stream (varint too long)")


def join_streams(streams: Mapping[str, bytes]) -> bytes:
  """Nests named streams in one: count, then (name, length, payload) each."""
  out = bytearray(write_varint(len(streams)))
  for name, payload in streams.items():
    raw = _check_name(name)
    out += write_varint(len(raw)) + raw + write_varint(len(payload)) + payload
  return bytes(out)


def split_streams(data: bytes) -> dict[str, bytes]:
  """Inverse of join_streams; BitstreamError on malformed input."""
  data = _as_bytes(data)
  count, pos = read_varint(data, 0)
  if count > MAX_STREAMS:
    raise BitstreamError("corrupt nested stream (count)")
  out = {}
  for _ in range(count):
    name_len, pos = read_varint(data, pos)
    if not 1 <= name_len <= MAX_NAME or pos + name_len > len(data):
      raise BitstreamError("corrupt nested stream (name)")
    raw = data[pos:pos + name_len]
    pos += name_len
    if not _NAME_RE.fullmatch(raw):
      raise BitstreamError("corrupt nested stream (name)")
    length, pos = read_varint(data, pos)
    if pos + length > len(data):
      raise BitstreamError("truncated nested stream")
    out[raw.decode("ascii")] = data[pos:pos + length]
    pos += length
  if pos != len(data):
    raise BitstreamError("corrupt nested stream (trailing bytes)")
  return out
