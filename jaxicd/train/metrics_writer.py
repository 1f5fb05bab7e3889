"""Training metrics: TensorBoard event files and ``metrics.jsonl`` in the workdir.

Only process 0 writes (the values are global anyway); other processes get a no-op writer.

The event writer is a few lines of protobuf wire format instead of tensorboardX, because
tensorboardX imports torch when it is installed (jaxicd never imports torch) and costs ~2 s.
An event file is a TFRecord stream of ``Event`` protos: the first carries ``file_version``,
each later one a ``Summary`` of scalar values.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import struct
import time
from typing import Mapping


# --- TFRecord + Event protos (wire format) -------------------------------------------------------

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    bits = n & 0x7F
    n >>= 7
    if n:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_proto(wall_time: float, step: int = 0, *, file_version: str | None = None,
                scalars: Mapping[str, float] | None = None) -> bytes:
  """``tensorflow.Event``: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
  if step:
    out += _varint(2 << 3 | 0) + _varint(int(step))
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if scalars:
    # Summary.value=1 -> Value{tag=1 (string), simple_value=2 (float)}
    summary = b"".join(
        _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                     + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _field_bytes(5, summary)
  return out


class EventFileWriter:
  """Appends scalar summaries to ``events.out.tfevents.<time>.<host>`` in ``logdir``."""

  def __init__(self, logdir: str | pathlib.Path):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self._file = open(self.path, "ab")
    self._file.write(tfrecord(event_proto(now, file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._file.write(tfrecord(event_proto(time.time(), step, scalars=values)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsWriter:
  """Appends one JSON line per ``write`` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = workdir / "metrics.jsonl"
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    if tensorboard:
      self._tb = EventFileWriter(workdir / "tensorboard")

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {}
    for key, value in metrics.items():
      value = float(value)
      clean[prefix + key] = value if math.isfinite(value) else str(value)
    record = {"step": int(step), "time": round(time.time(), 3), **clean}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.scalars(step, {k: v for k, v in clean.items() if isinstance(v, float)})
      self._tb.flush()

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """All records of ``metrics.jsonl`` (for tests, benches and reports)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
