"""Model swaps: admin load beside the serving model under load, failed loads, unload, and config reloads."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import yaml

from runtime.client import PolicyClient, ServerError
from runtime.config import load_deployment
from runtime.models import WARMUP_CALLS
from runtime.server import Server
from runtime_fakes import FakeLoader, deployment, model_dict, observation

TOKEN = "s3cret-admin-token"


class Load:
    """Client threads calling infer in a loop; records (marker, time) of every reply and every failure."""

    def __init__(self, endpoint: str, clients: int = 4):
        self.endpoint = endpoint
        self.replies: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
        self.failures: list = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in range(clients)]

    def _run(self, k: int) -> None:
        with PolicyClient(self.endpoint, timeout_ms=10_000, retries=0) as c:
            i = 0
            while not self._stop.is_set():
                obs = observation(i, size=16)
                try:
                    actions = c.infer(obs)["actions"]
                    marker = float(actions[0, 0] - obs["state"][0])
                    self.replies[k].append((marker, time.monotonic()))
                except Exception as e:  # noqa: BLE001 - a failed request is what the tests look for
                    self.failures.append(repr(e))
                i += 1

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_swap_under_load_fails_no_request():
    loader = FakeLoader(infer_s=0.002)  # long enough to run on the scheduler thread: requests are in flight at the swap
    with Server(deployment(admin_token=TOKEN), loader=loader) as server:
        endpoint = server.bound[0]
        loader.load_s = 0.5  # the new model takes a while to load and capture, as on a GPU
        with Load(endpoint) as load, PolicyClient(endpoint, token=TOKEN) as admin:
            time.sleep(0.2)
            t0 = time.monotonic()
            reply = admin.load(model_dict(prompt="a new default prompt"))
            t_swapped = time.monotonic()
            time.sleep(0.3)
        assert reply["generation"] == 2 and reply["replaced"] == 1 and reply["load_s"] >= 0.5
        assert load.failures == []
        old, new = loader.policies
        for replies in load.replies:
            markers = [m for m, _ in replies]
            assert set(markers) == {old.marker, new.marker}
            switch = markers.index(new.marker)
            assert all(m == new.marker for m in markers[switch:])  # never back to the old model
            # the old model kept serving while the new one loaded
            assert sum(1 for m, t in replies if m == old.marker and t0 < t < t_swapped) > 0
        # every request the old model accepted, it answered: its calls = warm-ups + old-marker replies
        assert old.calls == WARMUP_CALLS + sum(m == old.marker for r in load.replies for m, _ in r)
        with PolicyClient(endpoint) as c:
            assert c.metadata()["generation"] == 2
            assert c.metadata()["spec"]["default_prompt"] == "a new default prompt"
            # the old model is let go once its last request is answered, not at the next swap
            deadline = time.monotonic() + 5
            while c.stats()["retiring"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert c.stats()["retiring"] == 0


def test_failed_swap_keeps_the_old_model_serving():
    loader = FakeLoader()
    with Server(deployment(admin_token=TOKEN), loader=loader) as server:
        endpoint = server.bound[0]
        with Load(endpoint, clients=2) as load, PolicyClient(endpoint, token=TOKEN) as admin:
            loader.load_s = 0.2
            with pytest.raises(ServerError) as e:
                admin.load(model_dict(checkpoint="/nonexistent/checkpoint"))
            assert e.value.code == "bad_checkpoint"
            assert "'demo'" in e.value.message and "keeps serving" in e.value.message
            assert "/nonexistent/checkpoint" in e.value.message
            loader.fail = RuntimeError("CUDA out of memory (simulated)")
            with pytest.raises(ServerError) as e:
                admin.load(model_dict())
            assert e.value.code == "internal" and "out of memory" in e.value.message
        assert load.failures == []
        assert {m for r in load.replies for m, _ in r} == {1000.0}
        with PolicyClient(endpoint) as c:
            assert c.models()[0]["generation"] == 1
            np.testing.assert_array_equal(c.infer(observation(7.0))["actions"][0, :3], [1007.0, 1008.0, 1009.0])


def test_load_a_second_model_then_unload():
    loader = FakeLoader()
    with Server(deployment(admin_token=TOKEN), loader=loader) as server:
        with PolicyClient(server.bound[0], token=TOKEN) as c:
            c.load(model_dict("arm2", action_dim=3))
            assert [m["name"] for m in c.models()] == ["demo", "arm2"]
            assert c.infer(observation(), model="arm2")["actions"].shape == (10, 3)
            assert c.unload("demo") == {"model": "demo", "unloaded": True}
            with pytest.raises(ServerError) as e:
                c.infer(observation(), model="demo")
            assert e.value.code == "unknown_model"
            assert c.infer(observation())["actions"].shape == (10, 3)  # now the only model: the default
            with pytest.raises(ServerError) as e:
                c.unload("demo")
            assert e.value.code == "unknown_model"


def test_reload_applies_config_file_changes(tmp_path):
    path = tmp_path / "deploy.yaml"
    config = {"server": {"bind": "tcp://127.0.0.1:*"}, "models": [model_dict("a"), model_dict("b")]}
    path.write_text(yaml.safe_dump(config))
    loader = FakeLoader()
    with Server(load_deployment(path), loader=loader) as server, PolicyClient(server.bound[0]) as c:

        def generations() -> dict:
            return {m["name"]: m["generation"] for m in c.models()}

        def wait_for(expected: dict) -> None:
            deadline = time.monotonic() + 10
            while generations() != expected:
                assert time.monotonic() < deadline, generations()
                time.sleep(0.02)

        assert generations() == {"a": 1, "b": 2}
        # b changes, c is new, a is untouched: only b and c load
        config["models"] = [model_dict("a"), model_dict("b", num_steps=5), model_dict("c")]
        path.write_text(yaml.safe_dump(config))
        server.reload()
        wait_for({"a": 1, "b": 3, "c": 4})
        # a broken file changes nothing
        path.write_text("models: [{name: a, kind: pi7}]")
        server.reload()
        time.sleep(0.3)
        assert generations() == {"a": 1, "b": 3, "c": 4}
        # a removed model is unloaded
        config["models"] = [model_dict("a"), model_dict("c")]
        path.write_text(yaml.safe_dump(config))
        server.reload()
        wait_for({"a": 1, "c": 4})
        assert len(loader.policies) == 4


def test_a_swapped_out_model_is_freed_despite_the_frozen_heap():
    """Serving freezes the heap, so no garbage collection walks the models while serving; a model
    swapped out is still freed, reference cycles included, once its last request is answered."""
    loader, first = FakeLoader(), []

    def load(config):
        policy = loader(config)
        loader.policies.clear()  # the test keeps a weak reference only
        policy.cycle = policy  # only the garbage collector can free a cycle
        if not first:
            first.append(weakref.ref(policy))
        return policy

    with Server(deployment(admin_token=TOKEN), loader=load) as server:
        assert gc.get_freeze_count() > 0
        with PolicyClient(server.bound[0], token=TOKEN) as c:
            c.infer(observation())
            assert c.load(model_dict())["replaced"] == 1
            deadline = time.monotonic() + 5
            while (c.stats()["retiring"] or first[0]() is not None) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert first[0]() is None, "the swapped-out model is still alive"
            assert c.infer(observation())["actions"].shape == (10, 7)
