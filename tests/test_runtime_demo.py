"""The runtime with the real engine: configs/demo.yaml's tiny random Pi0.5 on the CPU, loaded by
flashrt.load. Round trips in the three encodings, reset, every bad input, swaps, the C++ client."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import threading

import numpy as np
import pytest

from runtime.client import PolicyClient, ServerError
from runtime.config import load_deployment
from runtime.server import Server
from runtime_bad_inputs import TOKEN, check_bad_inputs
from runtime_fakes import model_dict, observation
from runtime_wire import (groot_pack, groot_unpack, msgpack_numpy_pack, msgpack_numpy_unpack, openpi_pack,
                          openpi_unpack, rpc)


@pytest.fixture(scope="module")
def demo():
    config = load_deployment("configs/demo.yaml")
    config.server = dataclasses.replace(config.server, bind="tcp://127.0.0.1:*", admin_token=TOKEN)
    with Server(config) as server:  # the real loader: flashrt.load
        yield server.bound[0]


@pytest.mark.parametrize("pack, unpack", [(openpi_pack, openpi_unpack), (groot_pack, groot_unpack),
                                          (msgpack_numpy_pack, msgpack_numpy_unpack)],
                         ids=["openpi", "isaac-gr00t npy", "msgpack-numpy"])
def test_demo_round_trip_in_each_encoding(demo, pack, unpack):
    obs = {**observation(0.1), "prompt": "pick up the red cube"}
    reply = unpack(rpc(demo, pack({"endpoint": "infer", "id": 1, "data": obs}), timeout_ms=30_000))
    assert reply["ok"] is True and reply["id"] == 1, reply
    actions = reply["data"]["actions"]
    assert isinstance(actions, np.ndarray) and actions.dtype == np.float32 and actions.shape == (10, 7)
    assert np.isfinite(actions).all() and np.abs(actions).max() > 0


def test_demo_metadata_and_reset_makes_runs_repeatable(demo):
    with PolicyClient(demo, timeout_ms=30_000) as c:
        meta = c.metadata()
        assert meta["spec"]["kind"] == "pi05" and meta["spec"]["random_weights"] is True
        assert meta["outputs"]["actions"]["shape"] == [10, 7]
        obs = observation(0.3, size=96)  # any image size: the engine resizes
        c.reset()
        first = c.infer(obs)["actions"]
        second = c.infer(obs)["actions"]  # the noise generator moved on
        c.reset()
        again = c.infer(obs)["actions"]
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, second)


def test_demo_bad_inputs(demo, tmp_path):
    check_bad_inputs(demo, tmp_path)


def test_demo_failed_and_good_swap_under_load(demo):
    failures, replies, stop = [], [], threading.Event()

    def load() -> None:
        with PolicyClient(demo, timeout_ms=30_000, retries=0) as c:
            while not stop.is_set():
                try:
                    replies.append(c.infer(observation(size=64))["actions"].shape)
                except Exception as e:  # noqa: BLE001 - the test asserts there are none
                    failures.append(repr(e))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        with PolicyClient(demo, token=TOKEN) as admin:
            with pytest.raises(ServerError) as e:
                admin.load(model_dict(checkpoint="/nonexistent/pi05"))
            assert e.value.code == "bad_checkpoint" and "keeps serving" in e.value.message
            assert admin.models()[0]["generation"] == 1
            done = admin.load({**model_dict(), "random": {"seed": 1, "size": "tiny"}, "num_steps": 4})
            assert done["generation"] == 2 and done["replaced"] == 1
            assert admin.metadata()["spec"]["num_steps"] == 4
    finally:
        stop.set()
        worker.join(60)
    assert failures == [] and len(replies) > 0 and set(replies) == {(10, 7)}


def test_cpp_client_round_trip(demo, tmp_path):
    """The C++ example, built from its Makefile with Debian's libzmq and msgpack-c, against this server."""
    assert shutil.which("g++") and shutil.which("pkg-config"), "scripts/test.sh installs g++ and pkg-config"
    build = subprocess.run(["make", "-C", "examples/cpp", f"BUILD={tmp_path}"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(tmp_path / "flashrt_client"), demo, "3"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("actions [10, 7] float32") == 3
    assert "error reply: unknown_endpoint" in run.stdout and "cpp client: ok" in run.stdout
