"""Wire format between the sandbox's caller, its executor and the executor's children.

A message is a 16-byte prefix (header length, payload length), a JSON header and the raw
bytes of numeric arrays. Never pickle: a child running model-written code could otherwise
forge a message that runs code in the executor or the caller when unpickled. Only bool,
integer and float arrays are accepted, and a header nested deeper than
:data:`MAX_JSON_DEPTH` is refused before it is parsed (no ``RecursionError``).

A child runs model-written code, so its result message is untrusted: :func:`check_result`
validates it against a schema (types, size limits, the expected array shape) and
:func:`clean_text` makes every string that leaves the sandbox valid, printable UTF-8 of
bounded length.

Standard library and numpy only: the executor imports this before anything else.
"""

from __future__ import annotations

import json
import os
import re
import select
import struct
import time

import numpy as np

_PREFIX = struct.Struct("<QQ")
PREFIX_BYTES = _PREFIX.size
_ARRAY_KINDS = "biuf"  # bool, signed, unsigned, float: never object arrays
MAX_HEADER_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
#: A child's result: the most its JSON header may take.
MAX_RESULT_HEADER_BYTES = 64 << 10
#: Error text that leaves the sandbox is cut to this many characters.
MAX_ERROR_CHARS = 4000
#: Failure kinds a child may report about its own program; anything else is forged.
CHILD_KINDS = frozenset({"syntax", "exception", "no_model", "bad_proba", "setup"})
#: Every kind a :class:`~etpo_lightning.envs.sandbox.SandboxResult` may carry.
RESULT_KINDS = CHILD_KINDS | {
    "ok", "timeout", "output_limit", "exit", "signal", "memory", "setup", "protocol",
    "executor_crash", "executor_timeout", "shutdown", "internal",
}  # fmt: skip

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff]")


def clean_text(value: object, limit: int = MAX_ERROR_CHARS) -> str:
    """``value`` as valid UTF-8 text for a prompt: lone surrogates and undecodable bytes
    become U+FFFD, ANSI escape sequences are removed, other control characters (NUL
    included; tab and newline kept) become U+FFFD, and at most ``limit`` characters remain."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value[: 4 * limit + 64]).decode("utf-8", errors="replace")
    else:
        text = value if isinstance(value, str) else repr(value)
        text = text[: 4 * limit + 64]  # bound the work below
        text = _SURROGATE.sub("\ufffd", text)
    text = _CONTROL.sub("\ufffd", _ANSI.sub("", text))
    if len(text) > limit:
        marker = "... [truncated]"
        text = text[: max(limit - len(marker), 0)] + marker
    return text


def json_depth(head: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text (brackets inside strings skipped), without
    parsing it: vectorised, so a 64 KB header of escapes costs well under a millisecond."""
    text = np.frombuffer(head, dtype=np.uint8)
    n = text.size
    if n == 0:
        return 0
    idx = np.arange(n)
    # A quote is a string delimiter unless an odd run of backslashes precedes it.
    last_plain = np.maximum.accumulate(np.where(text != ord("\\"), idx, -1))
    run_before = np.empty(n, dtype=np.int64)
    run_before[0] = 0
    run_before[1:] = idx[:-1] - last_plain[:-1]
    delimiter = (text == ord('"')) & (run_before % 2 == 0)
    outside = np.cumsum(delimiter) % 2 == 0
    opens = outside & ((text == ord("[")) | (text == ord("{")))
    closes = outside & ((text == ord("]")) | (text == ord("}")))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


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


def unpack_prefix(data: bytes) -> tuple[int, int]:
    """(header length, payload length) from the first :data:`PREFIX_BYTES` of a message."""
    return _PREFIX.unpack_from(data)


def decode_message(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`encode_message` for a complete buffer; ``ValueError`` if malformed."""
    if len(data) < _PREFIX.size:
        raise ValueError("truncated message")
    n_head, n_payload = _PREFIX.unpack_from(data)
    if n_head > MAX_HEADER_BYTES or _PREFIX.size + n_head + n_payload != len(data):
        raise ValueError("message length mismatch")
    return _decode_parts(data[_PREFIX.size : _PREFIX.size + n_head], data[_PREFIX.size + n_head :])


def _decode_parts(head: bytes, payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    if json_depth(head) > MAX_JSON_DEPTH:
        raise ValueError(f"message header nested deeper than {MAX_JSON_DEPTH} levels")
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
        try:
            name, dtype, shape = spec
            dtype = np.dtype(dtype)
            ok_shape = isinstance(shape, list) and len(shape) <= 32 and all(type(s) is int and s >= 0 for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"bad array spec {str(spec)[:200]!r}") from None
        if not isinstance(name, str) or dtype.kind not in _ARRAY_KINDS or not ok_shape:
            raise ValueError(f"bad array spec {str(spec)[:200]!r}")
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


def payload_limit(expect_shape: list[int] | tuple[int, ...] | None) -> int:
    """Most payload bytes a valid result can have: one float64 array of ``expect_shape``."""
    if expect_shape is None:
        return 1 << 31
    return int(np.prod(expect_shape, dtype=np.int64)) * 8


def describe_shape_error(shape: tuple, expect_shape: tuple) -> str:
    return (
        f"predict_proba returned an array of shape {tuple(shape)}; expected {tuple(expect_shape)} "
        "(one row per test sample, one column per class)"
    )


def check_result(
    header: object, arrays: dict[str, np.ndarray], expect_shape: tuple[int, int] | None, allowed_kinds: frozenset[str] = CHILD_KINDS
) -> tuple[dict, np.ndarray | None]:
    """Validate a result message against the schema; ``ValueError(reason)`` if it breaks it.

    Schema: ``{"ok": bool, "kind": str (one of ``allowed_kinds``; absent or "ok" when ok),
    "error": str or None}`` plus, when ``ok``, exactly one array ``proba``: float64,
    ``expect_shape`` (when given), finite. A failure carries no arrays. Returns the
    cleaned header (``error`` through :func:`clean_text`) and the probabilities.
    """
    if not isinstance(header, dict):
        raise ValueError("the result header is not an object")
    ok = header.get("ok")
    if type(ok) is not bool:
        raise ValueError(f"'ok' is a {type(ok).__name__}, not a bool")
    kind = header.get("kind", "ok" if ok else None)
    if not isinstance(kind, str):
        raise ValueError(f"'kind' is a {type(kind).__name__}, not a string")
    error = header.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"'error' is a {type(error).__name__}, not a string")
    if ok:
        if kind != "ok" or error is not None:
            raise ValueError("a successful result with a failure kind or an error")
        if set(arrays) != {"proba"}:
            raise ValueError(f"a successful result must carry exactly the array 'proba', not {sorted(arrays)[:5]}")
        proba = arrays["proba"]
        if proba.dtype != np.float64:
            raise ValueError(f"'proba' has dtype {proba.dtype}, not float64")
        if expect_shape is not None and tuple(proba.shape) != tuple(expect_shape):
            raise ValueError(describe_shape_error(proba.shape, expect_shape))
        if not np.isfinite(proba).all():
            raise ValueError("predict_proba returned NaN or infinite values")
        return {"ok": True, "kind": "ok", "error": None}, proba
    if kind not in allowed_kinds:
        raise ValueError(f"unknown failure kind {clean_text(kind, 40)!r}")
    if arrays:
        raise ValueError("a failed result carries arrays")
    return {"ok": False, "kind": kind, "error": clean_text(error or f"the program failed ({kind})")}, None
