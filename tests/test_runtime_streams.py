"""Periodic models over real PUB/SUB sockets: a release every period on the newest observation
published, action chunks published with their release time and sequence number; overruns,
refusals and bad observations counted and reported on the stream; reset, swap and unload of a
periodic model; and configs/demo.yaml's real engine as a periodic model, end to end."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import zmq

from runtime.client import ActionSubscriber, ObservationPublisher, PolicyClient, ServerError
from runtime.config import load_deployment, parse_model
from runtime.protocol import NPY, encode
from runtime.server import Server
from runtime_fakes import FakeLoader, deployment, first_chunk, model_dict, observation, periodic

TOKEN = "s3cret-admin-token"


def state_of(chunk: dict, marker: float = 1000.0) -> float:
    return float(chunk["actions"][0, 0] - marker)


def test_periodic_model_runs_every_period_on_the_newest_observation():
    loader = FakeLoader(plans={"cam": [0, 2, 2, 2, 0]})
    config = deployment(periodic("cam", 50, deadline_ms=30))
    with Server(config, loader=loader) as server, \
            ActionSubscriber(server.streams["publish"], "cam") as sub, \
            ObservationPublisher(server.streams["observe"]) as pub, PolicyClient(server.bound[0]) as c:
        meta = c.metadata()["schedule"]
        assert meta["trigger"] == "periodic" and meta["period_ms"] == 50 and meta["realtime"] is True
        assert meta["streams"] == {"topic": "cam", **server.streams}
        chunk = first_chunk(pub, sub, "cam", observation(0, size=16))
        assert state_of(chunk) == 0.0 and chunk["actions"].shape == (10, 7) and chunk["model"] == "cam"
        chunk = sub.recv()  # just after a release: the ten below arrive within one period
        for k in range(10):
            pub.publish("cam", observation(100 + k, size=16))
            time.sleep(0.001)  # a camera faster than the period, not a burst that the publisher drops
        chunks = [chunk] + [sub.recv() for _ in range(6)]
        # only the newest of them was ever used, by every release after it
        assert [state_of(c) for c in chunks[1:]] == [109.0] * 6
        seq = np.array([c["seq"] for c in chunks])
        release = np.array([c["release_ms"] for c in chunks])
        assert (np.diff(seq) >= 1).all()
        np.testing.assert_allclose(np.diff(release), 50.0 * np.diff(seq), atol=0.01)  # exactly on the period
        assert abs(release[-1] / 1e3 - time.time()) < 1.0  # unix milliseconds
        assert all(c["latency_ms"] >= 6 for c in chunks) and np.median([c["latency_ms"] for c in chunks]) < 30
        # latest(): the newest chunk queued, older ones dropped
        time.sleep(0.16)
        newest = sub.latest()
        assert newest["seq"] >= chunks[-1]["seq"] + 3
        with pytest.raises(TimeoutError):
            sub.recv(timeout_ms=0)
        stats = c.stats()
    s = stats["models"]["cam"]
    assert s["completed"] >= 10 and s["published"] >= 10 and s["invalid_observations"] == 0
    assert s["latency_ms"]["p50"] >= 6 and s["count"] == 0  # no requests: the stream is not a request
    assert stats["streams"]["received"] >= 11 and stats["streams"]["invalid"] == {}
    assert stats["streams"]["published"] >= s["published"]


def test_overruns_refusals_and_bad_observations_are_counted_and_the_stream_goes_on():
    loader = FakeLoader(plans={"slow": [0, 10, 10, 10, 0], "tight": [0, 5, 5, 5, 0]})
    config = deployment(periodic("slow", 20), periodic("tight", 50, deadline_ms=5))
    with Server(config, loader=loader) as server, \
            ActionSubscriber(server.streams["publish"], "slow") as slow, \
            ActionSubscriber(server.streams["publish"], "tight") as tight, \
            ObservationPublisher(server.streams["observe"]) as pub, PolicyClient(server.bound[0]) as c:
        first_chunk(pub, slow, "slow", observation(1, size=8))
        # 30 ms of work every 20 ms: every other release is skipped (the previous one still runs)
        seqs = [slow.recv()["seq"] for _ in range(6)]
        assert all(b - a >= 2 for a, b in zip(seqs, seqs[1:])), seqs
        # 15 ms of work, a 5 ms deadline: every release refused, and the stream says so
        pub.publish("tight", observation(1, size=8))
        with pytest.raises(ServerError) as e:
            tight.recv(timeout_ms=2000)
        assert e.value.code == "deadline" and "cannot meet its deadline" in e.value.message
        # an observation that does not fit the model: an error on the stream, every release, until a good one
        pub.publish("slow", {**observation(1, size=8), "state": np.zeros(5, np.float32)})
        deadline = time.monotonic() + 2
        while True:
            try:
                slow.recv()
            except ServerError as err:
                assert err.code == "bad_input" and "state" in err.message
                break
            assert time.monotonic() < deadline
        pub.publish("slow", observation(7, size=8))
        deadline = time.monotonic() + 2
        while True:
            try:
                if state_of(slow.recv()) == 7.0:
                    break
            except ServerError:
                pass  # releases before the good observation arrived
            assert time.monotonic() < deadline
        # what cannot even be decoded never reaches a model: counted by the server
        raw = zmq.Context.instance().socket(zmq.PUB)
        raw.linger = 0
        raw.connect(server.streams["observe"])
        time.sleep(0.2)  # slow joiner
        raw.send_multipart([b"nope", encode(observation(1, size=8))])
        raw.send_multipart([b"tight", b"\xc1 not msgpack"])
        raw.send_multipart([b"slow"])  # (one per model: two queued for one model, only the newest is read)
        raw.close()
        deadline = time.monotonic() + 2
        while sum((stats := c.stats())["streams"]["invalid"].values()) < 3:
            assert time.monotonic() < deadline, stats["streams"]
            time.sleep(0.01)
        assert stats["streams"]["invalid"] == {"unknown_model": 1, "bad_request": 2}
        assert state_of(slow.recv()) == 7.0  # none of it disturbed the stream
    s, t = stats["models"]["slow"], stats["models"]["tight"]
    assert s["skipped"] >= 5 and s["misses"] >= s["skipped"] and s["invalid_observations"] >= 1
    assert t["rejected"] >= 1 and t["misses"] >= t["rejected"] and t["completed"] == 0


def test_reset_and_infer_on_a_periodic_model():
    loader = FakeLoader(plans={"cam": [0, 2, 2, 0]}, noisy=True)
    with Server(deployment(periodic("cam", 30)), loader=loader) as server, \
            ActionSubscriber(server.streams["publish"], "cam") as sub, \
            ObservationPublisher(server.streams["observe"]) as pub, PolicyClient(server.bound[0]) as c:
        first_chunk(pub, sub, "cam", observation(0, size=8))
        before = [state_of(sub.recv()) for _ in range(3)]  # the noise draws go up by one per release
        assert np.diff(before).tolist() == [1.0, 1.0] and before[0] >= 2
        assert c.reset() == {}
        after = [state_of(sub.recv()) for _ in range(4)]
        if after[0] != 1.0:  # a release already on its way when the reset ran
            after = after[1:]
        assert after[:3] == [1.0, 2.0, 3.0]
        with pytest.raises(ServerError) as e:
            c.infer(observation(size=8))
        assert e.value.code == "bad_request" and "periodic" in e.value.message
        assert server.streams["observe"] in e.value.message and server.streams["publish"] in e.value.message


def test_swap_keeps_the_stream_and_unload_ends_it():
    loader = FakeLoader(plans={"cam": [0, 2, 2, 0]})
    config = deployment(periodic("cam", 30), model_dict("other"), admin_token=TOKEN)
    with Server(config, loader=loader) as server, \
            ActionSubscriber(server.streams["publish"], "cam") as sub, \
            ObservationPublisher(server.streams["observe"]) as pub, PolicyClient(server.bound[0], token=TOKEN) as c:
        first_chunk(pub, sub, "cam", observation(0, size=8))
        loaded = c.load({**periodic("cam", 30), "prompt": "a new default prompt"})
        assert loaded["replaced"] is not None
        chunks = []
        while len([x for x in chunks if x["actions"][0, 0] >= 2000]) < 3:
            chunks.append(sub.recv())
        markers = [1000 if x["actions"][0, 0] < 2000 else 2000 for x in chunks]
        assert markers == sorted(markers)  # never back to the old model
        seq = np.array([x["seq"] for x in chunks])
        release = np.array([x["release_ms"] for x in chunks])
        # one stream across the swap: no restart of the numbering, releases still on the same grid
        assert (np.diff(seq) >= 1).all()
        np.testing.assert_allclose(np.diff(release), 30.0 * np.diff(seq), atol=0.01)
        assert c.unload("cam") == {"model": "cam", "unloaded": True}
        while True:  # chunks already on their way, then silence
            try:
                sub.recv(timeout_ms=150)
            except TimeoutError:
                break
        pub.publish("cam", observation(0, size=8))
        deadline = time.monotonic() + 2
        while c.stats()["streams"]["invalid"].get("unknown_model", 0) < 1:
            pub.publish("cam", observation(0, size=8))
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert list(c.stats()["models"]) == ["other"]
        assert c.infer(observation(size=8), model="other")["actions"].shape == (10, 7)


def test_a_periodic_model_loaded_later_binds_the_streams():
    with Server(deployment(admin_token=TOKEN), loader=FakeLoader()) as server:
        assert server.streams == {"publish": None, "observe": None}  # nothing periodic: no extra ports
        with PolicyClient(server.bound[0], token=TOKEN) as c:
            c.load(periodic("cam", 30))
            assert server.streams["publish"] and server.streams["observe"]
            with ActionSubscriber(server.streams["publish"], "cam") as sub, \
                    ObservationPublisher(server.streams["observe"]) as pub:
                assert state_of(first_chunk(pub, sub, "cam", observation(3, size=8)), 2000.0) == 3.0


def test_demo_model_as_a_periodic_stream():
    """configs/demo.yaml's tiny Pi0.5 (the real engine on the CPU) released every 100 ms."""
    config = load_deployment("configs/demo.yaml")
    config.server = dataclasses.replace(config.server, bind="tcp://127.0.0.1:*", publish_bind="tcp://127.0.0.1:*",
                                        observe_bind="tcp://127.0.0.1:*")
    data = {**model_dict(), "random": {"seed": 0, "size": "tiny"},
            "schedule": {"trigger": "periodic", "period_ms": 100}}  # no deadline: CPU timings vary too much
    config.models = [parse_model(data, "test")]
    with Server(config) as server, ActionSubscriber(server.streams["publish"], "demo", timeout_ms=3000) as sub, \
            ObservationPublisher(server.streams["observe"], encoding=NPY) as pub:
        obs = {**observation(0.1), "prompt": "pick up the red cube"}
        chunks = [first_chunk(pub, sub, "demo", obs, seconds=30)] + [sub.recv() for _ in range(3)]
        for chunk in chunks:
            actions = chunk["actions"]
            assert isinstance(actions, np.ndarray) and actions.dtype == np.float32 and actions.shape == (10, 7)
            assert np.isfinite(actions).all() and np.abs(actions).max() > 0
        assert all(b["seq"] > a["seq"] for a, b in zip(chunks, chunks[1:]))
        assert not np.array_equal(chunks[-1]["actions"], chunks[-2]["actions"])  # fresh noise every release
        with PolicyClient(server.bound[0]) as c:
            s = c.stats()["models"]["demo"]
        assert s["completed"] >= 4 and s["published"] >= 4 and s["invalid_observations"] == 0
