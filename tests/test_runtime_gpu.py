"""The scheduled runtime on a GPU (pytest -m gpu): CUDA streams and events drive two tiny models'
segments, a periodic stream beside requests; the server's results equal the engine's own; a swap
loads and captures a model while the scheduler keeps the GPU busy."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose  # imported here: numpy.testing loads lazily, ~10 ms under the GIL

import flashrt
from runtime.client import ActionSubscriber, ObservationPublisher, PolicyClient
from runtime.config import parse_model
from runtime.scheduler import CudaDevice
from runtime.server import Server
from runtime_fakes import deployment, first_chunk, model_dict, observation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOKEN = "s3cret-admin-token"


def gpu_model(name: str, kind: str, seed: int, **extra) -> dict:
    return {**model_dict(name, kind=kind), "device": "cuda", "random": {"seed": seed, "size": "tiny"}, **extra}


def test_scheduled_runtime_on_cuda():
    rt = gpu_model("rt", "pi05", 0, schedule={"trigger": "periodic", "period_ms": 20, "deadline_ms": 15})
    req = gpu_model("req", "pi0", 1)
    observations = [observation(i, size=96, seed=i) for i in range(3)]
    direct = flashrt.load(parse_model(req, "test").engine_config())  # before the server: no capture beside it
    direct.reset()
    expected = [direct.infer(o)["actions"] for o in observations]
    t0 = time.perf_counter()
    for o in observations:
        direct.infer(o)
    solo_ms = round((time.perf_counter() - t0) / len(observations) * 1e3, 2)
    server = Server(deployment(rt, req, admin_token=TOKEN))
    with server, PolicyClient(server.bound[0], timeout_ms=30_000, token=TOKEN) as c, \
            ActionSubscriber(server.streams["publish"], "rt", timeout_ms=5000) as sub, \
            ObservationPublisher(server.streams["observe"]) as pub:
        assert isinstance(server._scheduler.device, CudaDevice)
        chunk = first_chunk(pub, sub, "rt", observation(0, size=96), seconds=30)
        assert chunk["actions"].shape == (10, 7) and np.isfinite(chunk["actions"]).all()
        # requests while the stream runs on the other stream: exactly the engine's own results
        c.reset(model="req")
        got = [c.infer(o, model="req")["actions"] for o in observations]
        for a, b in zip(got, expected):
            assert_allclose(a, b, rtol=0, atol=1e-5)
        chunks = [sub.recv() for _ in range(10)]
        assert all(b["seq"] > a["seq"] for a, b in zip(chunks, chunks[1:]))
        latencies = [round(x["latency_ms"], 2) for x in chunks]
        print("release -> result, ms:", latencies, "solo:", solo_ms)
        assert np.median(latencies) < 20  # within the period
        stats = c.stats()["models"]
    assert stats["rt"]["completed"] >= 10 and stats["rt"]["published"] >= 10
    assert stats["req"]["completed"] == 3 and stats["req"]["errors"] == 0
    print({k: {m: stats[k][m] for m in ("completed", "misses", "skipped", "rejected", "latency_ms")} for k in stats})


def test_swap_captures_beside_a_busy_scheduler():
    """A load captures CUDA graphs while the scheduler thread keeps launching and querying events on
    its own streams (a periodic stream never lets the GPU idle): the capture must not be invalidated
    by the other thread's calls, and the stream must go on. This needs the engine to capture with
    capture_error_mode="thread_local" (the default, "global", fails on the other thread's calls:
    "operation not permitted when stream is capturing")."""
    rt = gpu_model("rt", "pi05", 0, schedule={"trigger": "periodic", "period_ms": 10})
    server = Server(deployment(rt, admin_token=TOKEN))
    with server, PolicyClient(server.bound[0], timeout_ms=60_000, token=TOKEN) as c, \
            ActionSubscriber(server.streams["publish"], "rt", timeout_ms=5000) as sub, \
            ObservationPublisher(server.streams["observe"]) as pub:
        first_chunk(pub, sub, "rt", observation(0, size=96), seconds=30)
        assert c.load(gpu_model("other", "pi0", 1))["generation"] == 2
        assert c.load({**rt, "num_steps": 4})["replaced"] == 1
        assert np.isfinite(c.infer(observation(1, size=96), model="other")["actions"]).all()
        chunks = [sub.recv() for _ in range(5)]
        assert all(np.isfinite(x["actions"]).all() for x in chunks)
