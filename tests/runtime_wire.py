"""Other libraries' wire conventions, written from their specifications (shared/reference/protocols.md),
so the tests talk to the server exactly as an openpi, Isaac-GR00T or msgpack-numpy client would.

Each decoder recognises only its own library's array form, as the real ones do: a reply in the wrong
form comes back as a plain map and the test fails.
"""

from __future__ import annotations

import io
from typing import Any

import msgpack
import numpy as np
import zmq


def _walk(obj: Any, fn) -> Any:
    if isinstance(obj, dict):
        return {k: _walk(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, (np.ndarray, np.generic)) else obj


# openpi-client msgpack_numpy: bin keys, dtype.str, tobytes()
def openpi_pack(obj: Any, str_keys: bool = False) -> bytes:
    k = (lambda s: s) if str_keys else (lambda s: s.encode())

    def arr(a):
        return {k("__ndarray__"): True, k("data"): a.tobytes(), k("dtype"): a.dtype.str, k("shape"): list(a.shape)}

    return msgpack.packb(_walk(obj, arr))


def openpi_unpack(body: bytes) -> Any:
    def hook(obj):
        if b"__ndarray__" in obj:
            return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
        return obj

    return msgpack.unpackb(body, object_hook=hook)


# Isaac-GR00T MsgSerializer: str keys, a whole .npy file
def groot_pack(obj: Any) -> bytes:
    def arr(a):
        f = io.BytesIO()
        np.save(f, a, allow_pickle=False)
        return {"__ndarray_class__": True, "as_npy": f.getvalue()}

    return msgpack.packb(_walk(obj, arr))


def groot_unpack(body: bytes) -> Any:
    def hook(obj):
        if "__ndarray_class__" in obj:
            return np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False)
        return obj

    return msgpack.unpackb(body, object_hook=hook)


# lebedov/msgpack-numpy 0.4.8: bin keys nd/type/kind/shape/data (older releases: str keys, no kind)
def msgpack_numpy_pack(obj: Any, str_keys: bool = False) -> bytes:
    def arr(a):
        if str_keys:
            return {"nd": True, "type": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
        return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}

    return msgpack.packb(_walk(obj, arr))


def msgpack_numpy_unpack(body: bytes) -> Any:
    def hook(obj):
        if obj.get(b"nd") is True:
            return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"type"]), shape=obj[b"shape"])
        return obj

    return msgpack.unpackb(body, object_hook=hook)


def rpc(endpoint: str, frames: bytes | list, timeout_ms: int = 3000, kind: int = zmq.REQ) -> bytes | None:
    """One raw request on a fresh REQ (or DEALER) socket; the reply body, or None on timeout."""
    sock = zmq.Context.instance().socket(kind)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames if isinstance(frames, list) else [frames])
        if not sock.poll(timeout_ms):
            return None
        return sock.recv_multipart()[-1]
    finally:
        sock.close()
