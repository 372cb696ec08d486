"""The server over real loopback sockets, against fast fake policies: every endpoint, the three
array encodings, concurrent clients, and every kind of bad input getting an error reply."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import msgpack
import numpy as np
import pytest
import zmq

from runtime.client import PolicyClient, ServerError
from runtime.protocol import encode
from runtime.server import Server
from runtime_bad_inputs import TOKEN, check_bad_inputs
from runtime_fakes import FakeLoader, deployment, model_dict, observation
from runtime_wire import (groot_pack, groot_unpack, msgpack_numpy_pack, msgpack_numpy_unpack, openpi_pack,
                          openpi_unpack, rpc)

@pytest.fixture
def served():
    loader = FakeLoader()
    with Server(deployment(admin_token=TOKEN), loader=loader) as server:
        yield server.bound[0], loader


def expected_actions(state: np.ndarray, marker: float = 1000.0) -> np.ndarray:
    return np.tile(state[np.arange(7) % 8] + marker, (10, 1)).astype(np.float32)


def test_endpoints(served):
    endpoint, loader = served
    with PolicyClient(endpoint) as c:
        assert c.ping()["models"] == ["demo"]
        meta = c.metadata()
        assert meta["model"] == "demo" and meta["generation"] == 1
        assert meta["spec"]["cameras"] == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
        assert meta["inputs"]["images"]["right_wrist_0_rgb"]["optional"] is True
        assert meta["outputs"]["actions"]["shape"] == [10, 7]
        obs = observation(3.0)
        out = c.infer(obs)
        np.testing.assert_array_equal(out["actions"], expected_actions(obs["state"]))
        assert set(c.last_timing) == {"server_ms", "queue_ms", "infer_ms"}
        assert 0 < c.last_timing["infer_ms"] <= c.last_timing["server_ms"]
        resets = loader.policies[0].resets
        assert c.reset() == {}
        assert loader.policies[0].resets == resets + 1
        [m] = c.models()
        assert (m["name"], m["kind"], m["generation"], m["queue"]) == ("demo", "pi05", 1, 0)
        deadline = time.monotonic() + 2  # the worker records a request's stats just after sending its reply
        while (stats := c.stats())["models"]["demo"]["count"] < 2:
            assert time.monotonic() < deadline
        s = stats["models"]["demo"]
        assert s["count"] == 2 and s["errors"] == 0  # the infer and the reset
        for metric in ("queue_ms", "infer_ms", "total_ms", "overhead_ms", "decode_ms", "encode_ms"):
            assert 0 <= s[metric]["p50"] <= s[metric]["p95"] <= s[metric]["p99"], metric
        assert stats["requests"] >= 6


# The three encodings, each as its own library writes and reads it. The reply must come back in the
# requester's convention (the library's decoder finds the actions as an array).
WIRES = {
    "openpi": (openpi_pack, openpi_unpack),
    "isaac-gr00t npy": (groot_pack, groot_unpack),
    "msgpack-numpy": (msgpack_numpy_pack, msgpack_numpy_unpack),
}


@pytest.mark.parametrize("wire", WIRES)
def test_round_trip_in_each_encoding(served, wire):
    pack, unpack = WIRES[wire]
    endpoint, _ = served
    obs = observation(5.0)
    reply = unpack(rpc(endpoint, pack({"endpoint": "infer", "id": "req-1", "data": obs})))
    assert reply["ok"] is True and reply["id"] == "req-1"
    actions = reply["data"]["actions"]
    assert isinstance(actions, np.ndarray), f"reply not in the {wire} convention: {actions!r:.100}"
    np.testing.assert_array_equal(actions, expected_actions(obs["state"]))


def test_state_as_plain_list_and_zero_copy_frames(served):
    endpoint, _ = served
    obs = observation(1.0)
    with PolicyClient(endpoint, frames=True) as c:  # 150 KB images go as extra frames
        np.testing.assert_array_equal(c.infer(obs)["actions"], expected_actions(obs["state"]))
    plain = {"images": obs["images"], "state": [float(v) for v in obs["state"]]}
    with PolicyClient(endpoint, frames=False) as c:
        np.testing.assert_array_equal(c.infer(plain)["actions"], expected_actions(obs["state"]))


def test_concurrent_clients_every_reply_matched(served):
    """8 clients x 200 requests, each with its own state: every reply carries its request's values."""
    endpoint, _ = served
    failures: list = []
    replies = [0] * 8

    def run(k: int) -> None:
        try:
            with PolicyClient(endpoint, timeout_ms=10_000) as c:
                for i in range(200):
                    obs = observation(k * 1000 + i, size=16)
                    actions = c.infer(obs)["actions"]  # the client also checks the reply's id
                    if not np.array_equal(actions, expected_actions(obs["state"])):
                        failures.append((k, i, actions[0, 0]))
                    replies[k] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((k, repr(e)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert replies == [200] * 8


def test_pipelined_dealer_gets_every_reply_once(served):
    """A DEALER sends 60 requests without waiting (within max_queue); each is answered once, by id."""
    endpoint, _ = served
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        sent = {}
        for i in range(60):
            obs = observation(i, size=8)
            sent[f"d-{i}"] = obs["state"]
            sock.send(encode({"endpoint": "infer", "id": f"d-{i}", "data": obs}))
        got = {}
        while len(got) < 60:
            assert sock.poll(5000), f"only {len(got)} of 60 replies"
            reply = openpi_unpack(sock.recv())
            assert reply["ok"] is True
            got[reply["id"]] = reply["data"]["actions"]
        assert set(got) == set(sent)
        for rid, state in sent.items():
            np.testing.assert_array_equal(got[rid], expected_actions(state))
    finally:
        sock.close()


def test_every_bad_input_gets_an_error_reply_and_serving_goes_on(served, tmp_path):
    endpoint, _ = served
    check_bad_inputs(endpoint, tmp_path)
    with PolicyClient(endpoint) as c:
        stats = c.stats()
        # Refused by the I/O thread, before any model: the message-level problems.
        assert stats["rejected"]["bad_request"] == 6 and stats["rejected"]["unknown_endpoint"] == 1
        # The observation problems count against the model (its own checks, and the I/O thread's).
        assert stats["models"]["demo"]["errors_by_code"] == {"bad_input": 8}
        assert stats["rejected"]["bad_input"] >= 5  # broken arrays: refused while decoding


def test_error_replies_echo_the_id(served):
    endpoint, _ = served
    reply = msgpack.unpackb(rpc(endpoint, encode({"endpoint": "infer", "id": 99, "data": {"state": 1}})))
    assert reply["id"] == 99 and reply["ok"] is False and reply["error"]["code"] == "bad_input"
    assert reply["timing"]["server_ms"] >= 0


def test_a_failing_model_call_is_an_internal_error_reply(served):
    endpoint, _ = served
    with PolicyClient(endpoint) as c:
        with pytest.raises(ServerError) as e:
            c.infer({**observation(), "prompt": "crash"})
        assert e.value.code == "internal" and "ZeroDivisionError" in e.value.message
        assert c.infer(observation())["actions"].shape == (10, 7)


class InferOnly:
    """A loader's own policy with `infer` and no `prepare`, served through executor.WholePolicy; it
    keeps a weak reference to each observation's first image."""

    def __init__(self, policy):
        self.policy, self.spec, self.seen = policy, policy.spec, []

    def infer(self, obs: dict) -> dict:
        self.seen.append(weakref.ref(obs["images"]["base_0_rgb"]))
        return self.policy.infer(obs)

    def reset(self) -> None:
        self.policy.reset()


def test_a_request_is_freed_when_answered():
    """A request's arrays (views over its frames) go by reference counting once it is answered, not
    by Python's cycle collector later (executor._Whole says why that matters): with the collector
    off, each one must be gone soon after its reply."""
    policies: list[InferOnly] = []

    def loader(config):
        policies.append(InferOnly(FakeLoader()(config)))
        return policies[-1]

    gc.collect()
    gc.disable()
    try:
        with Server(deployment(), loader=loader) as server, PolicyClient(server.bound[0]) as c:
            for i in range(3):
                c.infer(observation(i))
                image = policies[-1].seen[-1]
                deadline = time.monotonic() + 5.0
                while image() is not None and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert image() is None, f"request {i}'s image is still alive after its reply"
    finally:
        gc.enable()


def test_oversized_messages(tmp_path):
    with Server(deployment(max_message_bytes=64 << 10), loader=FakeLoader()) as server:
        endpoint = server.bound[0]
        big = encode({"endpoint": "infer", "data": observation(size=224)})  # 300 KB > 64 KB
        reply = msgpack.unpackb(rpc(endpoint, big))
        assert reply["error"]["code"] == "too_large"
        assert str(64 << 10) in reply["error"]["message"] and "max_message_bytes" in reply["error"]["message"]
        # Far over the limit, libzmq drops the connection without reading it all: no reply, no harm.
        assert rpc(endpoint, b"\0" * (2 << 20), timeout_ms=500) is None
        with PolicyClient(endpoint) as c:
            assert c.infer(observation(size=32))["actions"].shape == (10, 7)


def test_several_models_and_busy(tmp_path):
    loader = FakeLoader(infer_s=0.05)
    config = deployment(model_dict("a"), model_dict("b", state_dim=4, action_dim=4), max_queue=2)
    with Server(config, loader=loader) as server:
        endpoint = server.bound[0]
        with PolicyClient(endpoint) as c:
            with pytest.raises(ServerError) as e:
                c.infer(observation())
            assert e.value.code == "unknown_model" and "(a, b)" in e.value.message
            assert c.infer(observation(), model="a")["actions"].shape == (10, 7)
            small = {"images": observation()["images"], "state": np.ones(4, np.float32)}
            assert c.infer(small, model="b")["actions"].shape == (10, 4)
        # A DEALER floods model a: past max_queue waiting requests, the rest are refused with busy.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        for i in range(8):
            sock.send(encode({"endpoint": "infer", "model": "a", "id": i, "data": observation(size=8)}))
        codes = []
        for _ in range(8):
            assert sock.poll(5000)
            r = msgpack.unpackb(sock.recv())
            codes.append("ok" if r["ok"] else r["error"]["code"])
        sock.close()
        assert codes.count("busy") >= 4 and codes.count("ok") >= 2, codes


def test_stop_answers_queued_requests(tmp_path):
    loader = FakeLoader(infer_s=0.05)
    server = Server(deployment(), loader=loader).start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.bound[0])
    for i in range(5):
        sock.send(encode({"endpoint": "infer", "id": i, "data": observation(size=8)}))
    time.sleep(0.05)
    server.stop()
    got = []
    while sock.poll(1000):
        got.append(msgpack.unpackb(sock.recv())["ok"])
    sock.close()
    assert got == [True] * 5  # every queued request finished and was answered before the socket closed


def test_client_lazy_pirate_resends_after_a_lost_reply():
    """A server that drops the first request: the client gives up on that socket, reconnects, resends."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    seen = []

    def serve() -> None:
        for attempt in range(2):
            frames = router.recv_multipart()
            seen.append(msgpack.unpackb(frames[-1])["id"])
            if attempt == 1:  # answer only the resend
                router.send_multipart(frames[:-1] + [msgpack.packb({"ok": True, "id": seen[-1], "data": "pong"})])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with PolicyClient(f"tcp://127.0.0.1:{port}", timeout_ms=300, retries=2) as c:
            assert c.call("ping") == "pong"
        thread.join(5)
        assert len(seen) == 2 and seen[0] == seen[1]  # the same request, sent twice
        with PolicyClient(f"tcp://127.0.0.1:{port}", timeout_ms=100, retries=1) as c:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="after 2 attempt"):
                c.call("ping")
            assert time.monotonic() - t0 < 2
    finally:
        router.close()
