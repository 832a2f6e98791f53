"""Wire format between the sandbox's caller, its executor and the executor's children.

A message is a 16-byte prefix (header length, payload length), a JSON header and the raw
bytes of numeric arrays. Never pickle: a child running model-written code could otherwise
forge a message that runs code in the executor or the caller when unpickled. Only bool,
integer and float arrays are accepted.

Standard library and numpy only: the executor imports this before anything else.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time

import numpy as np

_PREFIX = struct.Struct("<QQ")
_ARRAY_KINDS = "biuf"  # bool, signed, unsigned, float: never object arrays
MAX_HEADER_BYTES = 16 << 20


def encode_message(header: dict, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """Serialise a JSON-able header and numeric arrays into one message."""
    specs, blobs = [], []
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        if array.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"array {name!r} has unsupported dtype {array.dtype}")
        specs.append([name, array.dtype.str, list(array.shape)])
        blobs.append(array.tobytes())
    head = json.dumps({"header": header, "arrays": specs}).encode()
    payload = b"".join(blobs)
    return _PREFIX.pack(len(head), len(payload)) + head + payload


def decode_message(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`encode_message` for a complete buffer; ``ValueError`` if malformed."""
    if len(data) < _PREFIX.size:
        raise ValueError("truncated message")
    n_head, n_payload = _PREFIX.unpack_from(data)
    if n_head > MAX_HEADER_BYTES or _PREFIX.size + n_head + n_payload != len(data):
        raise ValueError("message length mismatch")
    return _decode_parts(data[_PREFIX.size : _PREFIX.size + n_head], data[_PREFIX.size + n_head :])


def _decode_parts(head: bytes, payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        meta = json.loads(head)
        header, specs = meta["header"], meta["arrays"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed message header: {exc}") from None
    if not isinstance(header, dict) or not isinstance(specs, list):
        raise ValueError("malformed message header")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        name, dtype, shape = spec
        dtype = np.dtype(dtype)
        if dtype.kind not in _ARRAY_KINDS or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"bad array spec {spec!r}")
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(payload):
            raise ValueError("array data truncated")
        arrays[str(name)] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
        offset += nbytes
    if offset != len(payload):
        raise ValueError("trailing bytes after the arrays")
    return header, arrays


def _wait_fd(fd: int, deadline: float | None, write: bool = False) -> None:
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    ready = select.select([], [fd], [], max(remaining, 0)) if write else select.select([fd], [], [], max(remaining, 0))
    if not (ready[1] if write else ready[0]):
        raise TimeoutError("timed out waiting for the sandbox pipe")


def read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    """Read exactly ``n`` bytes; ``EOFError`` on a closed pipe, ``TimeoutError`` at the deadline."""
    chunks, remaining = [], n
    while remaining:
        _wait_fd(fd, deadline)
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, deadline: float | None = None, max_bytes: int = 1 << 31) -> tuple[dict, dict[str, np.ndarray]]:
    """Read one message from a pipe."""
    n_head, n_payload = _PREFIX.unpack(read_exact(fd, _PREFIX.size, deadline))
    if n_head > MAX_HEADER_BYTES or n_head + n_payload > max_bytes:
        raise ValueError(f"message too large ({n_head + n_payload} bytes)")
    head = read_exact(fd, n_head, deadline)
    payload = read_exact(fd, n_payload, deadline)
    return _decode_parts(head, payload)


def write_all(fd: int, data: bytes, deadline: float | None = None) -> None:
    """Write all of ``data``; ``TimeoutError`` if the reader stops reading until the deadline."""
    view = memoryview(data)
    while view:
        _wait_fd(fd, deadline, write=True)
        written = os.write(fd, view[: 1 << 20])
        view = view[written:]
