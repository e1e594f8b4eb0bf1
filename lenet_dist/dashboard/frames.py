"""The frames the evaluator sends its dashboard process through a pipe: u32 length | u32 header length | JSON
header | raw array bytes. The header names each array's dtype (a short allow-list) and shape: the child reads
numbers and JSON only, never a pickle."""
from __future__ import annotations

import json
import struct

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64, "uint8": np.uint8, "int64": np.int64}
MAX_FRAME = 256 << 20


class BadFrame(ValueError):
    pass


def encode(header, arrays=None):
    """One frame: `header` (JSON-ready dict) and named numpy arrays."""
    arrays = arrays or {}
    parts, specs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r}: dtype {a.dtype} cannot travel to the dashboard")
        specs.append([name, a.dtype.name, list(a.shape)])
        parts.append(a.tobytes())
    head = json.dumps(dict(header, arrays=specs), allow_nan=False).encode()
    body = b"".join(parts)
    return struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body


def read(stream):
    """The next frame from a binary stream as (header, {name: array}); None at end of stream."""
    first = stream.read(8)
    if not first:
        return None
    if len(first) < 8:
        raise BadFrame("truncated frame header")
    total, n_head = struct.unpack("<II", first)
    if total > MAX_FRAME or n_head > total - 4:
        raise BadFrame(f"frame of {total} bytes with a {n_head}-byte header")
    rest = stream.read(total - 4)
    if len(rest) != total - 4:
        raise BadFrame("truncated frame")
    header = json.loads(rest[:n_head])
    arrays, at = {}, n_head
    for name, dtype, shape in header.pop("arrays", []):
        if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadFrame(f"array {name!r}: dtype {dtype!r}, shape {shape!r}")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
        if at + n > len(rest):
            raise BadFrame(f"array {name!r} runs past the frame")
        arrays[name] = np.frombuffer(rest, DTYPES[dtype], int(np.prod(shape, dtype=np.int64)), at).reshape(shape)
        at += n
    return header, arrays


def replayed(frame):
    """An evaluation frame marked as a replay: its result is in the restored history already."""
    _, n_head = struct.unpack("<II", frame[:8])
    head = json.dumps(dict(json.loads(frame[8:8 + n_head]), replayed=True), allow_nan=False).encode()
    body = frame[8 + n_head:]
    return struct.pack("<II", 4 + len(head) + len(body), len(head)) + head + body


def jsonable(v):
    """numpy scalars and arrays inside a dict -> plain JSON values."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
