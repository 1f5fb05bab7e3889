"""A minimal, fast GGUF reader: metadata and memory-mapped tensor bytes.

``gguf.GGUFReader`` builds numpy views for every element of every metadata array, which takes
~12 s on SmolLM2's 49k-token vocabulary. Loading weights needs only the scalar metadata and the
tensor directory, so this reader skips long arrays (the tokenizer reads them on its own) and
leaves dequantization to ``gguf.quants``.

Format (little-endian): magic ``GGUF``, version u32 (2 or 3), tensor count u64, metadata count
u64; metadata entries ``key: string, type: u32, value``; tensor infos ``name: string,
n_dims: u32, dims: u64[n_dims] (innermost first), type: u32, offset: u64``; then tensor data at
the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import struct
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_ITEMS = 4096  # longer metadata arrays (vocab, merges, scores) are skipped


class GgufFormatError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]   # numpy order (outermost first), in elements
  type_id: int             # gguf.GGMLQuantizationType value
  offset: int              # absolute byte offset in the file
  nbytes: int
  row_bytes: int           # bytes of one innermost row


class GgufFile:
  """``metadata`` (scalars, strings, short arrays) and ``tensors`` of a GGUF file."""

  def __init__(self, path: str | pathlib.Path):
    # Imported here: `import gguf` is slowish and only loaders need it.
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    self.path = pathlib.Path(path)
    self._map = np.memmap(self.path, np.uint8, "r")
    self._buf = memoryview(self._map)
    self._pos = 0
    if bytes(self._take(4)) != b"GGUF":
      raise GgufFormatError("bad magic (not a GGUF file)")
    version = self._unpack("<I")
    if version not in (2, 3):
      raise GgufFormatError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
    self.metadata: dict[str, Any] = {}
    self.skipped_arrays: list[str] = []
    for _ in range(n_kv):
      key = self._string()
      value = self._value(self._unpack("<I"), key)
      if value is not _SKIPPED:
        self.metadata[key] = value
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      n_dims = self._unpack("<I")
      dims = [self._unpack("<Q") for _ in range(n_dims)]
      infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
    alignment = int(self.metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
      raise GgufFormatError(f"invalid general.alignment {alignment}")
    data_start = -(-self._pos // alignment) * alignment
    self.tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in infos:
      try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
      except (ValueError, KeyError):
        raise GgufFormatError(f"tensor {name!r}: unknown tensor type id {type_id}") from None
      if not dims or dims[0] % block:
        raise GgufFormatError(f"tensor {name!r}: shape {dims} does not fit type blocks")
      row_bytes = dims[0] // block * type_size
      nbytes = row_bytes * math.prod(dims[1:])
      begin = data_start + offset
      if begin + nbytes > len(self._map):
        raise GgufFormatError(f"tensor {name!r}: data ends at byte {begin + nbytes} but the file "
                              f"has {len(self._map)} bytes (truncated?)")
      self.tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), type_id,
                                      begin, nbytes, row_bytes)

  def raw(self, name: str) -> np.ndarray:
    """The tensor's bytes as uint8 ``[*outer_dims, row_bytes]`` (what ``gguf.quants`` takes)."""
    info = self.tensors[name]
    data = self._map[info.offset:info.offset + info.nbytes]
    return data.reshape(*info.shape[:-1], info.row_bytes)

  # -- parsing helpers --------------------------------------------------------------------------

  def _take(self, n: int) -> memoryview:
    if self._pos + n > len(self._buf):
      raise GgufFormatError(f"unexpected end of file at byte {self._pos}")
    out = self._buf[self._pos:self._pos + n]
    self._pos += n
    return out

  def _unpack(self, fmt: str) -> Any:
    return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

  def _string(self) -> str:
    n = self._unpack("<Q")
    return bytes(self._take(n)).decode("utf-8", errors="replace")

  def _value(self, type_id: int, key: str) -> Any:
    if type_id in _SCALARS:
      return self._unpack(_SCALARS[type_id])
    if type_id == _STRING:
      return self._string()
    if type_id == _ARRAY:
      item_type, count = self._unpack("<I"), self._unpack("<Q")
      if count > MAX_ARRAY_ITEMS:
        self._skip_array(item_type, count)
        self.skipped_arrays.append(key)
        return _SKIPPED
      return [self._value(item_type, key) for _ in range(count)]
    raise GgufFormatError(f"metadata {key!r}: unknown value type {type_id}")

  def _skip_array(self, item_type: int, count: int) -> None:
    if item_type in _SCALARS:
      self._take(struct.calcsize(_SCALARS[item_type]) * count)
    elif item_type == _STRING:
      buf, pos = self._buf, self._pos
      for _ in range(count):
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
      if pos > len(buf):
        raise GgufFormatError("unexpected end of file in a string array")
      self._pos = pos
    else:
      for _ in range(count):
        self._value(item_type, "array item")


_SKIPPED = object()


def _dequantize_q4(blocks: np.ndarray, with_min: bool) -> np.ndarray:
  # Q4_0: [d: f16][16 bytes], x = d * (q - 8); Q4_1: [d: f16][m: f16][16 bytes], x = d * q + m.
  # Byte j holds element j in its low nibble and element j + 16 in its high nibble.
  head = 4 if with_min else 2
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  qs = blocks[:, head:head + 16]
  q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
  if with_min:
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return d * q + m
  return d * (q - 8.0)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
  # [d: f16][32 x int8], x = d * q.
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  return d * blocks[:, 2:34].copy().view(np.int8).astype(np.float32)


# The types of the embedded model, vectorised over all blocks at once (gguf.quants loops over
# row groups and is ~10x slower); other types go through gguf.quants.
_FAST = {2: (34 - 16, lambda b: _dequantize_q4(b, False)),   # Q4_0: 18-byte blocks
         3: (20, lambda b: _dequantize_q4(b, True)),          # Q4_1: 20-byte blocks
         8: (34, _dequantize_q8_0)}                           # Q8_0: 34-byte blocks


def dequantize(raw: np.ndarray, type_id: int) -> np.ndarray:
  """float32 ``[*outer, row]`` from uint8 ``raw [*outer, row_bytes]`` of GGML type ``type_id``."""
  import gguf
  if type_id in _FAST:
    block_bytes, fn = _FAST[type_id]
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    row = raw.shape[-1] // block_bytes * 32
    return fn(blocks).reshape(*raw.shape[:-1], row)
  return np.asarray(gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(type_id)),
                    np.float32)
