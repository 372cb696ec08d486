"""Request-triggered models through the scheduler, over real loopback sockets, with fake engines whose
segments take known times (tests/runtime_fakes.py): priorities and deadlines decide between segments,
admission control answers `deadline`, late results are counted, the next request is staged while the
current one runs, and `reset` lands between the jobs before and after it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from flashrt.errors import InputError
from runtime.client import PolicyClient, ServerError
from runtime.protocol import decode, encode
from runtime.server import Server
from runtime_fakes import FakeLoader, deployment, model_dict, observation


class Dealer:
    """Several requests in flight on one DEALER socket; replies in the order they arrive."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.sent: dict = {}

    def send(self, rid, model: str, data=None, endpoint: str = "infer") -> None:
        msg = {"endpoint": endpoint, "id": rid, "model": model}
        if data is not None:
            msg["data"] = data
        self.sent[rid] = time.perf_counter()
        self.sock.send(encode(msg))

    def replies(self, n: int, timeout_ms: int = 5000) -> list[dict]:
        out = []
        while len(out) < n:
            assert self.sock.poll(timeout_ms), f"only {len(out)} of {n} replies"
            out.append(decode(self.sock.recv())[0])
        return out

    def close(self) -> None:
        self.sock.close()


def launches(loader: FakeLoader, model: str, since: float = 0.0) -> list[tuple]:
    return [t for t in loader.trace if t[0] == model and t[2] >= since]


def wait_until(cond, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_high_priority_request_overtakes_queued_best_effort_work():
    loader = FakeLoader(plans={"batch": [0, *[15.0] * 8, 0], "rt": [0, 5, 5, 5, 0]})
    config = deployment(model_dict("batch"), model_dict("rt", schedule={"priority": 1, "deadline_ms": 150}))
    with Server(config, loader=loader) as server:
        endpoint = server.bound[0]
        with PolicyClient(endpoint) as c:
            assert c.metadata(model="rt")["schedule"] == {"trigger": "request", "priority": 1, "deadline_ms": 150.0,
                                                          "period_ms": None, "realtime": True}
            assert [m["schedule"]["priority"] for m in c.models()] == [0, 1]
        d = Dealer(endpoint)
        t0 = time.perf_counter()
        d.send("b1", "batch", observation(1, size=8))
        d.send("b2", "batch", observation(2, size=8))  # queued behind b1 (both staged)
        wait_until(lambda: len(launches(loader, "batch", t0)) >= 3)  # b1 is on the "GPU"
        d.send("rt", "rt", observation(3, size=8))
        order = [r["id"] for r in d.replies(3)]
        d.close()
        assert order == ["rt", "b1", "b2"]
        # rt cut in between b1's segments: it waited for at most the segment running when it arrived
        batch, rt = launches(loader, "batch", t0), launches(loader, "rt", t0)
        b1 = batch[:10]
        assert b1[0][2] < rt[0][2] and rt[-1][3] < b1[-1][3]
        started_meanwhile = [s for s in batch if d.sent["rt"] < s[2] < rt[0][2]]
        assert len(started_meanwhile) <= 1, started_meanwhile
        with PolicyClient(endpoint) as c:
            stats = c.stats()["models"]
        assert stats["rt"]["completed"] == 1 and stats["rt"]["misses"] == 0 and stats["rt"]["rejected"] == 0
        assert stats["batch"]["completed"] == 2 and stats["batch"]["tardiness_ms"] == {"mean": 0.0, "max": 0.0}


def test_earlier_deadline_goes_first_at_equal_priority():
    loader = FakeLoader(plans={"loose": [0, *[10.0] * 6, 0], "tight": [0, 5, 5, 5, 0]})
    config = deployment(model_dict("loose", schedule={"deadline_ms": 2000}),
                        model_dict("tight", schedule={"deadline_ms": 300}))
    with Server(config, loader=loader) as server:
        d = Dealer(server.bound[0])
        t0 = time.perf_counter()
        d.send("loose", "loose", observation(1, size=8))
        wait_until(lambda: len(launches(loader, "loose", t0)) >= 2)
        d.send("tight", "tight", observation(2, size=8))
        assert [r["id"] for r in d.replies(2)] == ["tight", "loose"]
        d.close()
        loose, tight = launches(loader, "loose", t0), launches(loader, "tight", t0)
        assert loose[0][2] < tight[0][2] and tight[-1][3] < loose[-1][3]  # in between loose's segments


def test_admission_control_refuses_with_a_deadline_error_and_serving_goes_on():
    loader = FakeLoader(plans={"rt": [0, 15, 15, 15, 15, 0], "hopeless": [0, 10, 10, 10, 0]})
    config = deployment(model_dict("rt", schedule={"deadline_ms": 90}),
                        model_dict("hopeless", schedule={"deadline_ms": 10}))
    with Server(config, loader=loader) as server:
        endpoint = server.bound[0]
        with PolicyClient(endpoint) as c:
            # 30 ms of work can never finish within 10 ms: refused at once, never launched
            n = len(loader.trace)
            with pytest.raises(ServerError) as e:
                c.infer(observation(size=8), model="hopeless")
            assert e.value.code == "deadline"
            assert "'hopeless' cannot meet its deadline" in e.value.message and "deadline 10.0 ms" in e.value.message
            assert "30.0 ms its own" in e.value.message  # (the estimate adds however late the decision was)
            assert len(loader.trace) == n
        # Two at once: the first fits (60 of 90 ms, slack for a busy machine); the second would wait for
        # the first: refused unless the first had already run 30 ms when the second was admitted.
        d = Dealer(endpoint)
        d.send(1, "rt", observation(1, size=8))
        d.send(2, "rt", observation(2, size=8))
        replies = {r["id"]: r for r in d.replies(2)}
        d.close()
        assert replies[1]["ok"] is True
        assert replies[2]["ok"] is False and replies[2]["error"]["code"] == "deadline", replies[2]
        assert "deadline 90.0 ms" in replies[2]["error"]["message"]
        with PolicyClient(endpoint) as c:  # ... and serving goes on (the refused job's staging slot was freed)
            obs = observation(5, size=8)
            np.testing.assert_array_equal(c.infer(obs, model="rt")["actions"][0, :2], obs["state"][:2] + 1000)
            wait_until(lambda: c.stats()["models"]["rt"]["count"] == 3)
            stats = c.stats()
        rt = stats["models"]["rt"]
        assert (rt["completed"], rt["rejected"], rt["misses"]) == (2, 1, 1)
        assert rt["errors_by_code"] == {"deadline": 1}
        assert stats["models"]["hopeless"]["rejected"] == 1 and stats["models"]["hopeless"]["completed"] == 0


def test_late_results_are_delivered_and_counted_as_misses():
    loader = FakeLoader(plans={"late": [0, 5, 5, 5, 5, 0]})  # 20 ms, as the scheduler is told
    with Server(deployment(model_dict("late", schedule={"deadline_ms": 30})), loader=loader) as server:
        loader.latest("late").slowdown = 3.0  # ... but it takes 60 ms: admitted, then late
        with PolicyClient(server.bound[0]) as c:
            obs = observation(4, size=8)
            np.testing.assert_array_equal(c.infer(obs)["actions"][0, :2], obs["state"][:2] + 1000)
            s = c.stats()["models"]["late"]
    assert (s["completed"], s["misses"], s["rejected"]) == (1, 1, 0)
    assert 20 <= s["tardiness_ms"]["max"] == s["tardiness_ms"]["mean"] < 200
    assert 55 <= s["latency_ms"]["p50"] < 300 and s["latency_ms"]["n"] == 1


def test_next_request_is_staged_while_the_gpu_runs_the_current_one():
    loader = FakeLoader(plans={"demo": [0, 20, 20, 20, 0]})
    with Server(deployment(), loader=loader) as server:
        d = Dealer(server.bound[0])
        states = {i: observation(10 * i, size=8)["state"] for i in range(3)}
        for i in range(3):
            d.send(i, "demo", observation(10 * i, size=8))
        replies = d.replies(3)
        d.close()
    assert [r["id"] for r in replies] == [0, 1, 2]
    for r in replies:
        np.testing.assert_array_equal(r["data"]["actions"][0, :2], states[r["id"]][:2] + 1000)
    policy = loader.latest("demo")
    prepared = policy.prepared_at[-3:]
    outputs = [t[3] for t in launches(loader, "demo") if t[1] == "output"][-3:]
    assert prepared[1] < outputs[0]  # request 2 was staged while request 1 ran ...
    assert prepared[2] > outputs[0]  # ... request 3 only after request 1's result: two in flight at most


def test_reset_lands_between_the_jobs_before_and_after_it():
    """The noise generator a reset reseeds is read when a job's inputs launch: a reset queued behind
    two inferences must wait for them, and the inference after it must see the fresh seed."""
    loader = FakeLoader(plans={"demo": [0, 5, 5, 0]}, noisy=True)
    with Server(deployment(), loader=loader) as server:
        d = Dealer(server.bound[0])
        base = observation(0, size=8)
        for rid, endpoint in ((0, "infer"), (1, "infer"), (2, "reset"), (3, "infer"), (4, "infer")):
            d.send(rid, "demo", base if endpoint == "infer" else None, endpoint)
        replies = {r["id"]: r for r in d.replies(5)}
        d.close()
    assert replies[2]["ok"] is True and replies[2]["data"] == {}
    noise = {i: float(replies[i]["data"]["actions"][0, 0] - base["state"][0] - 1000) for i in (0, 1, 3, 4)}
    assert noise == {0: 1.0, 1: 2.0, 3: 1.0, 4: 2.0}  # (the warm-up's draw was reset at load)


class InferOnly:
    """A loader's own engine without `prepare`: only the engine's older interface."""

    def __init__(self, spec):
        self.spec = spec

    def infer(self, obs: dict) -> dict:
        if obs.get("state") is None:
            raise InputError("observation.state is missing")
        return {"actions": np.full((10, 7), float(np.asarray(obs["state"])[0]), np.float32)}

    def reset(self) -> None:
        pass


def test_a_policy_without_prepare_is_served_whole():
    def loader(config):
        return InferOnly(FakeLoader()(config).spec)

    with Server(deployment(), loader=loader) as server, PolicyClient(server.bound[0]) as c:
        assert c.infer(observation(3, size=8))["actions"][0, 0] == 3.0
        with pytest.raises(ServerError) as e:
            c.infer({"images": observation(size=8)["images"]})
        assert e.value.code == "bad_input" and "state" in e.value.message
        assert c.stats()["models"]["demo"]["completed"] == 1
