"""The wire format (protocol v1): one msgpack map per message, numpy arrays in three accepted encodings.

Needs only msgpack and numpy, so the robot-side client can use it without torch. docs/protocol.md is
the specification; this module is its implementation for both ends.

Arrays are decoded without copying where the bytes allow (a read-only view over the received bytes)
and nothing is ever unpickled: object, void and complex dtypes are refused before any data is read,
and the byte count must match dtype x shape exactly.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import msgpack
import numpy as np

VERSION = 1

# Array encodings. The decoder reports which one a request used so the reply can use the same:
# each library's decoder recognises only its own form (see docs/protocol.md).
OPENPI = "openpi"  # {__ndarray__: true, data, dtype, shape}: the native form
NPY = "npy"  # Isaac-GR00T: {__ndarray_class__: true, as_npy: <.npy file bytes>}
MSGPACK_NUMPY = "msgpack-numpy"  # {nd: true, type, kind, shape, data}
ENCODINGS = (OPENPI, NPY, MSGPACK_NUMPY)

# Error codes of `{ok: false, error: {code, message}}` replies.
BAD_REQUEST = "bad_request"  # not msgpack, not a map, or envelope fields of the wrong type
TOO_LARGE = "too_large"  # over the server's size limit; refused before decoding
BAD_INPUT = "bad_input"  # an array or observation that does not fit (the message names the field)
UNKNOWN_ENDPOINT = "unknown_endpoint"
UNKNOWN_MODEL = "unknown_model"
UNAUTHORIZED = "unauthorized"  # admin endpoint without the right token
BUSY = "busy"  # the model's queue is full
DEADLINE = "deadline"  # admission control: the request cannot finish by its model's deadline (schedule.deadline_ms)
UNAVAILABLE = "unavailable"  # the server is shutting down, or the model was unloaded meanwhile
INTERNAL = "internal"  # an unexpected failure inside the model (the server keeps serving)
# Engine failures keep the engine's own codes: bad_config, bad_checkpoint, unsupported, bad_input.

MAX_NDIM = 32
MAX_ARRAY_LEN = 1 << 20  # msgpack list / map lengths: bounds the objects a small message can create
MAX_MAP_LEN = 1 << 12


class ProtocolError(Exception):
    """A message the receiver cannot accept; becomes an error reply with this code and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# Decoding


_ALLOWED_KINDS = "biuf"  # bool, int, uint, float: nothing that needs pickle or has no fixed size
_dtype_cache: dict[str, np.dtype] = {}


def _dtype(name: Any) -> np.dtype:
    dt = _dtype_cache.get(name) if isinstance(name, str) else None
    if dt is not None:
        return dt
    if not isinstance(name, str) or len(name) > 32:
        raise ProtocolError(BAD_INPUT, f"array dtype must be a dtype string like '<f4' or '|u1', got {name!r}")
    try:
        dt = np.dtype(name)
    except Exception:
        raise ProtocolError(BAD_INPUT, f"array dtype {name!r} is not a numpy dtype") from None
    _check_kind(dt, repr(name))
    _dtype_cache[name] = dt  # only valid spellings are cached, so the cache stays small
    return dt


def _check_kind(dt: np.dtype, spelled: str) -> None:
    if dt.kind not in _ALLOWED_KINDS or dt.fields is not None:
        raise ProtocolError(
            BAD_INPUT,
            f"array dtype {spelled} is refused: only bool, int, uint and float arrays are accepted "
            "(object arrays would need pickle, which is never used)",
        )


def _shape(value: Any) -> tuple[int, ...]:
    if (type(value) is list or type(value) is tuple) and len(value) <= MAX_NDIM:
        for d in value:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(value)
    raise ProtocolError(BAD_INPUT, f"array shape must be a list of at most {MAX_NDIM} ints >= 0, got {value!r}")


def _view(data: Any, dt: np.dtype, shape: Any, offset: int = 0, order: str = "C") -> np.ndarray:
    """A read-only array over `data` after checking that its size is exactly dtype x shape.

    numpy checks the dims as it builds the view (ints, the buffer large enough); only a view that
    fails, or whose size is not the buffer's, gets the slow checks that name the problem. Every
    array of every request takes this path."""
    if type(data) is memoryview:  # an extra ZeroMQ frame: writable, so the view over it is made read-only
        data = data.toreadonly()
        size = data.nbytes - offset
    elif type(data) is bytes:  # immutable: the array is read-only by itself
        size = len(data) - offset
    else:
        raise ProtocolError(BAD_INPUT, f"array data must be msgpack bin bytes, got {type(data).__name__}")
    if (type(shape) is list or type(shape) is tuple) and len(shape) <= MAX_NDIM:
        try:
            if -1 not in shape:  # first: numpy 1.x infers a 1-D shape [-1]; other negatives raise
                arr = np.ndarray(shape, dt, data, offset, None, order)
                if arr.nbytes == size:
                    return arr
        except (TypeError, ValueError, OverflowError):
            pass
    shape = _shape(shape)  # names a shape that is not a list of ints >= 0
    need = dt.itemsize
    for d in shape:
        need *= d
    raise ProtocolError(BAD_INPUT, f"array of dtype {dt.str!r} and shape {list(shape)} needs {need} bytes "
                                   f"of data, got {size}")


def _npy(blob: Any) -> np.ndarray:
    """An .npy file's bytes (Isaac-GR00T) as a view; numpy's own header parser, pickle never allowed."""
    if not isinstance(blob, bytes):
        raise ProtocolError(BAD_INPUT, f"as_npy must be the bytes of an .npy file, got {type(blob).__name__}")
    f = io.BytesIO(blob)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dt = read_header(f, max_header_size=4096)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(BAD_INPUT, f"as_npy is not a valid .npy file: {e}") from None
    _check_kind(dt, repr(dt.str))
    return _view(blob, dt, shape, offset=f.tell(), order="F" if fortran_order else "C")


# Keys that mark a map as an array (in any accepted encoding, str or bin): a map with none of them
# is a plain map, found in one C call.
_MARKERS = frozenset(k for name in ("__ndarray__", "__ndarray_class__", "nd", "__npgeneric__")
                     for k in (name, name.encode()))


class _Reader:
    """msgpack object_hook: turns array maps into arrays and remembers which encoding was used."""

    __slots__ = ("frames", "encoding")

    def __init__(self, frames: list[memoryview]):
        self.frames = frames
        self.encoding: str | None = None

    def hook(self, obj: dict) -> Any:
        # Called for every map, so the common cases cost little: a plain map, and openpi's form with
        # bin keys as openpi-client and runtime.client write it.
        if _MARKERS.isdisjoint(obj):
            return obj
        if obj.get(b"__ndarray__") is True:
            return self._openpi(obj.get(b"dtype"), obj.get(b"shape"), obj.get(b"data"), obj.get(b"frame"))
        for key in obj:  # a map's keys are all str or all bin in practice: the first one tells
            if type(key) is bytes:
                obj = {(k.decode("utf-8", "replace") if type(k) is bytes else k): v for k, v in obj.items()}
            break
        if obj.get("__ndarray__") is True:
            return self._openpi(obj.get("dtype"), obj.get("shape"), obj.get("data"), obj.get("frame"))
        if obj.get("__ndarray_class__") is True:
            self.encoding = NPY
            return _npy(obj.get("as_npy"))
        if type(obj.get("nd")) is bool and "type" in obj and "data" in obj:
            return self._msgpack_numpy(obj)
        if obj.get("__npgeneric__") is True:
            self.encoding = self.encoding or OPENPI
            dt = _dtype(obj.get("dtype"))
            try:
                return dt.type(obj.get("data"))
            except (TypeError, ValueError, OverflowError):
                raise ProtocolError(BAD_INPUT, f"scalar {obj.get('data')!r} is not a {dt}") from None
        return obj

    def _openpi(self, dtype: Any, shape: Any, data: Any, frame: Any) -> np.ndarray:
        self.encoding = OPENPI
        dt = _dtype(dtype)
        if data is None and frame is not None:  # zero-copy: the bytes travel as an extra ZeroMQ frame
            if type(frame) is not int or not 0 <= frame < len(self.frames):
                raise ProtocolError(BAD_INPUT, f"array refers to frame {frame!r}, but the message has "
                                               f"{len(self.frames)} extra frame(s)")
            return _view(self.frames[frame], dt, shape)
        return _view(data, dt, shape)

    def _msgpack_numpy(self, obj: dict) -> Any:
        self.encoding = MSGPACK_NUMPY
        kind = obj.get("kind", b"")
        if kind not in (b"", ""):
            raise ProtocolError(BAD_INPUT, f"msgpack-numpy array of kind {kind!r} is refused: kind 'O' is a "
                                           "pickle and kind 'V' a structured dtype; neither is ever decoded")
        dt = _dtype(obj["type"])
        if obj["nd"]:
            return _view(obj["data"], dt, obj.get("shape"))
        return _view(obj["data"], dt, ())[()]  # a scalar: one element's bytes


def decode(body: Any, frames: list[memoryview] | None = None) -> tuple[Any, str | None]:
    """Unpack one message. Returns the object and the array encoding it used (None if no arrays).

    `body` is bytes or a buffer; `frames` are the message's extra frames that arrays may refer to.
    Raises ProtocolError with a message that says what is wrong.
    """
    reader = _Reader(frames or [])
    try:
        obj = msgpack.unpackb(body, object_hook=reader.hook, raw=False,
                              max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN)
    except ProtocolError:
        raise
    except Exception as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ProtocolError(BAD_REQUEST, f"not a valid msgpack message ({detail})") from None
    return obj, reader.encoding


# ---------------------------------------------------------------------------------------------
# Encoding


_wire_names: dict[np.dtype, str] = {}  # dtypes that may be sent -> their wire name ('<f4'); dtype.str is slow


def _wire_name(dt: np.dtype) -> str:
    name = _wire_names.get(dt)
    if name is None:
        if dt.kind not in _ALLOWED_KINDS or dt.fields is not None:
            raise TypeError(f"cannot send an array of dtype {dt}: only bool, int, uint and float")
        name = _wire_names[dt] = dt.str
    return name


def _contiguous(arr: np.ndarray) -> np.ndarray:
    _wire_name(arr.dtype)
    return np.ascontiguousarray(arr)


def _openpi_default(frames: list | None, frame_min_bytes: int):
    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            out = {b"__ndarray__": True, b"dtype": _wire_name(obj.dtype), b"shape": list(obj.shape)}
            arr = np.ascontiguousarray(obj)  # (a 0-d array becomes 1-d here, with the same bytes)
            if frames is not None and arr.nbytes >= frame_min_bytes:
                out[b"frame"] = len(frames)
                frames.append(arr)
            else:
                out[b"data"] = arr.data
            return out
        if isinstance(obj, np.generic):
            return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
        raise TypeError(f"cannot encode {type(obj).__name__}")

    return default


def _npy_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        f = io.BytesIO()
        np.save(f, _contiguous(obj), allow_pickle=False)
        return {"__ndarray_class__": True, "as_npy": f.getvalue()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _msgpack_numpy_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = _contiguous(np.asarray(obj))
        out = {b"nd": isinstance(obj, np.ndarray), b"type": arr.dtype.str, b"kind": b"", b"data": arr.tobytes()}
        if isinstance(obj, np.ndarray):
            out[b"shape"] = list(arr.shape)
        return out
    raise TypeError(f"cannot encode {type(obj).__name__}")


_DEFAULTS = {OPENPI: _openpi_default(None, 0), NPY: _npy_default, MSGPACK_NUMPY: _msgpack_numpy_default}
_packers = threading.local()  # one Packer per thread and encoding: packb would build one per message


def encode(obj: Any, encoding: str = OPENPI, frames: list | None = None, frame_min_bytes: int = 1 << 16) -> bytes:
    """Pack `obj` with its arrays in `encoding`.

    With `frames` (a list) and the openpi encoding, arrays of at least `frame_min_bytes` are appended
    to `frames` and referenced by index, to be sent as extra ZeroMQ frames without copying.
    """
    if frames is not None and encoding == OPENPI:
        return msgpack.packb(obj, default=_openpi_default(frames, frame_min_bytes))
    packer = getattr(_packers, encoding, None)
    if packer is None:
        if encoding not in _DEFAULTS:
            raise ValueError(f"unknown array encoding {encoding!r} (expected one of {', '.join(ENCODINGS)})")
        packer = msgpack.Packer(default=_DEFAULTS[encoding])
        setattr(_packers, encoding, packer)
    return packer.pack(obj)  # a failed pack leaves the packer empty for the next message


# ---------------------------------------------------------------------------------------------
# The envelope: {endpoint, data, model?, id?, token?} -> {ok, data | error, id?, timing}

ENVELOPE_KEYS = frozenset(("endpoint", "data", "model", "id", "token", "api_token"))  # api_token: Isaac-GR00T's name


def parse_envelope(msg: Any) -> tuple[str, Any, str | None, Any, str | None]:
    """Check a decoded request's envelope; returns (endpoint, data, model, id, token)."""
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, f"a request must be a msgpack map {{endpoint, data, model?, id?, token?}}, "
                                         f"got {type(msg).__name__}")
    if not ENVELOPE_KEYS.issuperset(msg):
        key = next(k for k in msg if k not in ENVELOPE_KEYS)
        raise ProtocolError(BAD_REQUEST, f"unknown request key {key!r} (expected: endpoint, data, model, id, token)")
    endpoint = msg.get("endpoint", "get_action")  # Isaac-GR00T's default
    model = msg.get("model")
    rid = msg.get("id")
    token = msg.get("token", msg.get("api_token"))
    if not isinstance(endpoint, str):
        raise ProtocolError(BAD_REQUEST, f"endpoint must be a string, got {endpoint!r}")
    if model is not None and not isinstance(model, str):
        raise ProtocolError(BAD_REQUEST, f"model must be a string, got {model!r}")
    if rid is not None and not (isinstance(rid, (str, bytes)) and len(rid) <= 256 or type(rid) is int):
        raise ProtocolError(BAD_REQUEST, f"id must be an int or a string of at most 256 characters, got {rid!r}")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(BAD_REQUEST, "token must be a string")
    return endpoint, msg.get("data"), model, rid, token
