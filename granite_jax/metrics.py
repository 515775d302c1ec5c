"""Where training metrics go: `WORKDIR/metrics.jsonl`, TensorBoard event files, a progress bar (or log lines), and
`jax.profiler` traces of a configured step range. Only process 0 writes (`enabled=False` elsewhere).

TensorBoard: `tensorboardX` is used when installed; otherwise `EventFileWriter` below writes the same scalar event
files (TFRecord framing, CRC32C, hand-encoded `Event`/`Summary` protos), so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import sys
import time
from typing import Any

import jax

log = logging.getLogger(__name__)


# TensorBoard events without TensorFlow -------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    """A serialized tensorflow `Event`: wall_time (1, double), step (2, int64), file_version (3) or summary (5) of
    `Summary.Value`s with tag (1) and simple_value (2, float)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        out += _bytes_field(5, values)
    return out


class EventFileWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>` (TFRecord framing)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._f = open(self.path, "ab")
        self._record(encode_event(time.time(), file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._record(encode_event(time.time(), step, scalars=scalars))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) of the scalar events of a file written by `EventFileWriter` (for tests and tooling)."""
    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = _read_varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = _read_varint(buf, i)
            elif wire == 1:
                value, i = buf[i:i + 8], i + 8
            elif wire == 5:
                value, i = buf[i:i + 4], i + 4
            else:
                n, i = _read_varint(buf, i)
                value, i = buf[i:i + n], i + n
            yield number, value

    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        record = data[i + 12:i + 12 + n]
        if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != _masked_crc(record):
            raise ValueError(f"{path}: bad record checksum at byte {i}")
        i += 16 + n
        event = dict(fields(record))
        if 5 in event:
            scalars = {}
            for number, value in fields(event[5]):
                v = dict(fields(value))
                scalars[v[1].decode()] = struct.unpack("<f", v[2])[0]
            out.append((event.get(2, 0), scalars))
    return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return EventFileWriter(logdir)

    class _TBX:
        def __init__(self):
            self._w = SummaryWriter(logdir)

        def add_scalars(self, step, scalars):
            for tag, value in scalars.items():
                self._w.add_scalar(tag, value, step)

        def flush(self):
            self._w.flush()

        def close(self):
            self._w.close()

    return _TBX()


# The logger -----------------------------------------------------------------------------------------------------

class MetricsLogger:
    """Writes one record per logged step to metrics.jsonl and TensorBoard, and drives the progress display."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
        self._bar = None
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        """Step `step` (1-based count of steps done) has finished."""
        if self.enabled and self._bar is not None:
            self._bar.update(step - self._bar.n)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._tb.add_scalars(step, {k: float(v) for k, v in record.items()
                                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)})
        self._tb.flush()
        if self._bar is not None:
            shown = {"loss": f"{metrics['loss']:.4f}"}
            if metrics.get("eval_loss") is not None:
                shown["eval_loss"] = f"{metrics['eval_loss']:.4f}"
            self._bar.set_postfix(shown, refresh=False)
        else:
            parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
            for key, fmt in (("eval_loss", ".4f"), ("grad_norm", ".3f"), ("lr", ".2e"), ("tokens_per_s", ".0f"), ("step_time_s", ".3f"),
                             ("mfu", ".1%")):
                if metrics.get(key) is not None:
                    parts.append(f"{key} {metrics[key]:{fmt}}")
            print(" | ".join(parts), flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()


class Profiler:
    """A `jax.profiler` trace of steps [start_step, start_step + num_steps) into `logdir` (off when num_steps <= 0)."""

    def __init__(self, logdir: str, start_step: int, num_steps: int, enabled: bool = True):
        self.logdir, self.start, self.stop = logdir, start_step, start_step + num_steps
        self.active = False
        self.enabled = enabled and num_steps > 0 and start_step >= 0

    def before_step(self, step: int) -> None:
        """Called before running step `step` (0-based)."""
        if self.enabled and not self.active and self.start <= step < self.stop:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, step: int, wait_for=None) -> None:
        if self.active and step + 1 >= self.stop:
            if wait_for is not None:
                jax.block_until_ready(wait_for)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.start, self.stop - 1, self.logdir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def peak_rss() -> int:
    """Peak resident memory of this process in bytes since it started (or exec'd): Linux's VmHWM, which unlike
    `getrusage().ru_maxrss` does not carry over the parent's peak into a forked-and-exec'd child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
