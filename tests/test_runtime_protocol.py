"""The wire codec on its own: the three array encodings both ways, zero copy, and every refusal."""

from __future__ import annotations

import io
import os
import pickle

import msgpack
import numpy as np
import pytest

from runtime import protocol as P
from runtime_wire import groot_pack, msgpack_numpy_pack, openpi_pack

ARRAYS = {
    "image": np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3),
    "state": np.linspace(-1, 1, 8, dtype=np.float32),
    "f64": np.array([[1.5, -2.0]], dtype=np.float64),
    "i64": np.array([1, -2, 3], dtype=np.int64),
    "flags": np.array([True, False]),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "big_endian": np.array([1.0, 2.0], dtype=">f4"),
}

PACKERS = {
    "openpi (bin keys)": (openpi_pack, P.OPENPI),
    "openpi (str keys)": (lambda o: openpi_pack(o, str_keys=True), P.OPENPI),
    "isaac-gr00t npy": (groot_pack, P.NPY),
    "msgpack-numpy (bin keys)": (msgpack_numpy_pack, P.MSGPACK_NUMPY),
    "msgpack-numpy < 0.4 (str keys)": (lambda o: msgpack_numpy_pack(o, str_keys=True), P.MSGPACK_NUMPY),
}


@pytest.mark.parametrize("name", PACKERS)
def test_decodes_each_library_encoding(name):
    pack, encoding = PACKERS[name]
    obj, seen = P.decode(pack({"data": ARRAYS, "text": "hi"}))
    assert seen == encoding
    assert obj["text"] == "hi"
    for key, expected in ARRAYS.items():
        got = obj["data"][key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("encoding", P.ENCODINGS)
def test_encode_decode_round_trip(encoding):
    obj, seen = P.decode(P.encode({"a": ARRAYS, "scalar": np.float32(2.5)}, encoding))
    assert seen == encoding
    for key, expected in ARRAYS.items():
        np.testing.assert_array_equal(obj["a"][key], expected)
        assert obj["a"][key].dtype == expected.dtype
    assert obj["scalar"] == 2.5


def test_decoded_arrays_are_read_only_views_of_the_received_bytes():
    frames: list = []
    body = P.encode({"img": ARRAYS["image"]}, frames=frames, frame_min_bytes=1)
    received = bytearray(frames[0].tobytes())  # a receive buffer, as a ZeroMQ frame would be
    obj, _ = P.decode(body, [memoryview(received)])
    img = obj["img"]
    assert np.shares_memory(img, np.frombuffer(received, np.uint8))  # no copy
    assert not img.flags.writeable
    received[0] = 99  # the view sees the buffer it was built on
    assert img[0, 0, 0] == 99


def test_fortran_order_npy_is_read_correctly():
    a = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    f = io.BytesIO()
    np.save(f, a, allow_pickle=False)
    obj, _ = P.decode(msgpack.packb({"__ndarray_class__": True, "as_npy": f.getvalue()}))
    np.testing.assert_array_equal(obj, a)


def _refused(body: bytes, code: str, *words: str) -> str:
    with pytest.raises(P.ProtocolError) as e:
        P.decode(body)
    assert e.value.code == code
    for w in words:
        assert w in e.value.message, e.value.message
    return e.value.message


def _openpi(**fields):
    return msgpack.packb({b"__ndarray__": True, **{k.encode(): v for k, v in fields.items()}})


def test_refuses_object_complex_and_structured_dtypes():
    _refused(_openpi(data=b"x" * 8, dtype="|O", shape=[1]), P.BAD_INPUT, "'|O'", "refused")
    _refused(_openpi(data=b"x" * 8, dtype="<c8", shape=[1]), P.BAD_INPUT, "refused")
    _refused(_openpi(data=b"x" * 8, dtype="f4,f4", shape=[1]), P.BAD_INPUT, "refused")
    _refused(_openpi(data=b"x" * 4, dtype="not-a-dtype", shape=[1]), P.BAD_INPUT, "not a numpy dtype")
    _refused(_openpi(data=b"x" * 4, dtype=7, shape=[1]), P.BAD_INPUT, "dtype")


def test_refuses_sizes_that_do_not_match_the_shape():
    msg = _refused(_openpi(data=b"\0" * 100, dtype="|u1", shape=[224, 224, 3]), P.BAD_INPUT, "150528", "100")
    assert "[224, 224, 3]" in msg
    _refused(_openpi(data=b"\0" * 16, dtype="<f4", shape=[2]), P.BAD_INPUT, "needs 8 bytes")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[-1]), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[1, -1]), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=["1"]), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[None]), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[True]), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[1.0]), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[1 << 62, 1 << 62]), P.BAD_INPUT, "needs", "got 4")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape="4"), P.BAD_INPUT, "shape")
    _refused(_openpi(data=b"\0" * 4, dtype="<f4", shape=[1] * 40), P.BAD_INPUT, "shape")
    _refused(_openpi(data="text, not bytes", dtype="|u1", shape=[15]), P.BAD_INPUT, "bin bytes")
    _refused(_openpi(dtype="|u1", shape=[2], frame=0), P.BAD_INPUT, "frame 0", "0 extra frame")


def test_refuses_broken_npy():
    f = io.BytesIO()
    np.save(f, np.zeros((4, 4), np.float32), allow_pickle=False)
    blob = f.getvalue()
    _refused(msgpack.packb({"__ndarray_class__": True, "as_npy": blob[:-10]}), P.BAD_INPUT, "needs 64 bytes", "54")
    _refused(msgpack.packb({"__ndarray_class__": True, "as_npy": b"not an npy file"}), P.BAD_INPUT, ".npy")
    obj_npy = blob.replace(b"'<f4'", b"'|O' ")
    _refused(msgpack.packb({"__ndarray_class__": True, "as_npy": obj_npy}), P.BAD_INPUT, "refused")


class _Exploit:
    """Unpickling this runs os.system: what msgpack-numpy's kind 'O' would do to a server."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    body = msgpack.packb({b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": payload})
    _refused(body, P.BAD_INPUT, "pickle")
    _refused(pickle.dumps({"endpoint": "ping"}), P.BAD_REQUEST, "msgpack")  # a raw pickle as the message
    assert not marker.exists()


def test_refuses_messages_that_are_not_msgpack():
    _refused(b"\xc1", P.BAD_REQUEST, "not a valid msgpack message")
    _refused(b"\x92\x01", P.BAD_REQUEST, "incomplete")
    _refused(b"", P.BAD_REQUEST, "msgpack")
    _refused(msgpack.packb({1: 2}), P.BAD_REQUEST, "map key")
    _refused(b"\xdd\xff\xff\xff\xff", P.BAD_REQUEST, "max_array_len")  # a 4-billion-element list header


def test_envelope_checks():
    assert P.parse_envelope({"endpoint": "ping", "id": 7}) == ("ping", None, None, 7, None)
    assert P.parse_envelope({"data": {}, "api_token": "t"})[0] == "get_action"  # Isaac-GR00T's defaults
    for bad, words in [([1, 2], "map"), ({"endpoint": 5}, "endpoint"), ({"endpoint": "x", "model": 3}, "model"),
                       ({"endpoint": "x", "id": [1]}, "id"), ({"endpoint": "x", "modle": "a"}, "'modle'"),
                       ({"endpoint": "x", "token": 1}, "token")]:
        with pytest.raises(P.ProtocolError) as e:
            P.parse_envelope(bad)
        assert e.value.code == P.BAD_REQUEST and words in e.value.message
