"""Every kind of bad request, with the error code and the words its reply must carry; shared by the
fake-model tests and the real demo model's tests."""

from __future__ import annotations

import os
import pickle

import msgpack
import numpy as np

from runtime.client import PolicyClient
from runtime.protocol import encode
from runtime_fakes import model_dict, observation
from runtime_wire import rpc

TOKEN = "s3cret-admin-token"  # the admin token of the servers these are sent to


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _bad_inputs(tmp_path, obs):
    """(name, request frames, expected code, words the message must contain)."""
    img, state = obs["images"]["base_0_rgb"], obs["state"]
    good = dict(obs)
    short = {b"__ndarray__": True, b"data": img.tobytes()[:1000], b"dtype": "|u1", b"shape": [224, 224, 3]}
    pickled = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": pickle.dumps(_Exploit(tmp_path / "pwned"))}
    return [
        ("garbage bytes", b"\xc1\xffgarbage", "bad_request", ["msgpack"]),
        ("empty message", b"", "bad_request", ["msgpack"]),
        ("a list, not a map", msgpack.packb([1, 2, 3]), "bad_request", ["map"]),
        ("endpoint of the wrong type", msgpack.packb({"endpoint": 42}), "bad_request", ["endpoint"]),
        ("unknown envelope key", msgpack.packb({"endpoint": "ping", "modle": "x"}), "bad_request", ["'modle'"]),
        ("data of the wrong type", encode({"endpoint": "infer", "data": "hello"}), "bad_input", ["data"]),
        ("images as a list", encode({"endpoint": "infer", "data": {"images": [1, 2], "state": state}}),
         "bad_input", ["images"]),
        ("misspelled key", encode({"endpoint": "infer", "data": {**good, "promt": "x"}}), "bad_input", ["'promt'"]),
        ("wrong image dtype", encode({"endpoint": "infer", "data": {**good, "images": {
            **obs["images"], "base_0_rgb": img.astype(np.float32)}}}), "bad_input", ["base_0_rgb", "uint8"]),
        ("wrong image shape", encode({"endpoint": "infer", "data": {**good, "images": {
            **obs["images"], "base_0_rgb": img[:, :, 0]}}}), "bad_input", ["base_0_rgb"]),
        ("wrong state shape", encode({"endpoint": "infer", "data": {**good, "state": state[:5]}}),
         "bad_input", ["state", "8"]),
        ("short byte buffer", msgpack.packb({"endpoint": "infer", "data": {"images": {"base_0_rgb": short}}}),
         "bad_input", ["150528", "1000"]),
        ("missing frame", msgpack.packb({"endpoint": "infer", "data": {"state": {
            "__ndarray__": True, "dtype": "<f4", "shape": [8], "frame": 3}}}), "bad_input", ["frame 3"]),
        ("object dtype", msgpack.packb({"endpoint": "infer", "data": {"state": {
            b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}}}), "bad_input", ["|O"]),
        ("pickle payload", msgpack.packb({"endpoint": "infer", "data": {"state": pickled}}), "bad_input", ["pickle"]),
        ("raw pickle message", pickle.dumps({"endpoint": "infer"}), "bad_request", ["msgpack"]),
        ("unknown endpoint", encode({"endpoint": "get_actoin"}), "unknown_endpoint", ["'get_actoin'", "infer"]),
        ("unknown model", encode({"endpoint": "infer", "model": "nope", "data": good}), "unknown_model",
         ["'nope'", "demo"]),
        ("missing camera", encode({"endpoint": "infer", "data": {**good, "images": {"base_0_rgb": img}}}),
         "bad_input", ["left_wrist_0_rgb"]),
        ("unknown camera", encode({"endpoint": "infer", "data": {**good, "images": {**obs["images"], "top": img}}}),
         "bad_input", ["'top'"]),
        ("admin without token", encode({"endpoint": "unload", "model": "demo"}), "unauthorized", ["token"]),
        ("admin with a wrong token", encode({"endpoint": "unload", "model": "demo", "token": "guess"}),
         "unauthorized", ["token"]),
        ("load without config", encode({"endpoint": "load", "token": TOKEN, "data": {}}), "bad_input", ["config"]),
        ("load with a bad config", encode({"endpoint": "load", "token": TOKEN, "data": {"config": {
            **model_dict(), "state_dim": 0}}}), "bad_config", ["state_dim"]),
    ]


def check_bad_inputs(endpoint: str, tmp_path) -> None:
    """Send each; each must get its error reply, and the server must go on serving after each."""
    obs = observation(2.0)
    with PolicyClient(endpoint) as c:
        for name, body, code, words in _bad_inputs(tmp_path, obs):
            raw = rpc(endpoint, body)
            assert raw is not None, f"{name}: no reply"
            reply = msgpack.unpackb(raw)
            assert reply["ok"] is False, name
            assert reply["error"]["code"] == code, (name, reply["error"])
            for w in words:
                assert w in reply["error"]["message"], (name, reply["error"]["message"])
            assert "server_ms" in reply["timing"], name
            actions = c.infer(obs)["actions"]  # ... and the server goes on serving
            assert actions.shape == (10, 7) and np.isfinite(actions).all(), name
        assert c.ping()["status"] == "ok"
    assert not (tmp_path / "pwned").exists()
