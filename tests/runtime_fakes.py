"""Test helpers for the runtime: a fake policy with the engine's interface, and deployment configs.

The fake's actions are a function of the request's state (plus a marker that changes with every
load), so a test can tell which request and which model generation a reply is for. It checks inputs
the way the engine's contract says (InputError naming the field) and keeps the job contract of
flashrt.job: `prepare` returns a job whose segments (inputs, steps, output; each with a known
`duration_ms`, which is also how long it takes) are launched in order, at most two jobs prepared and
not launched, `result()` only after the output segment. Every launch is recorded in `trace`, so a
test can see how the scheduler interleaved several models.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from flashrt.errors import CheckpointError, InputError
from flashrt.policy import PolicySpec
from runtime.config import DeploymentConfig, parse_deployment


class FakeSegment:
    def __init__(self, job: "FakeJob", name: str, duration_ms: float, fn=None):
        self.job, self.name, self.duration_ms, self.fn = job, name, duration_ms, fn

    def launch(self, stream=None) -> None:
        job, policy = self.job, self.job.policy
        if not policy._launching.acquire(blocking=False):  # the contract: one thread launches at a time
            raise RuntimeError("FakePolicy: segments launched from two threads at once")
        try:
            if job.segments.index(self) != job.launched:
                raise RuntimeError(f"FakePolicy: segment {self.name} launched out of order")
            if job.launched == 0:
                policy._unstage()
            t0 = time.perf_counter()
            actual_ms = self.duration_ms * policy.slowdown  # slowdown > 1: the durations told were too short
            if actual_ms >= 0.1:
                time.sleep(actual_ms / 1e3)
            if self.fn is not None:
                self.fn()
            job.launched += 1
            policy.trace.append((policy.spec.name, self.name, t0, time.perf_counter()))
        finally:
            policy._launching.release()


class FakeJob:
    """inputs (draws the noise), steps, output (writes the actions); a `crash` job fails mid-way."""

    def __init__(self, policy: "FakePolicy", actions: np.ndarray, crash: bool):
        self.policy, self.launched, self.noise = policy, 0, 0
        self._actions, self._out, self._cancelled = actions, None, False
        plan = policy.plan
        steps = [FakeSegment(self, f"step{i}", ms) for i, ms in enumerate(plan[1:-1])]
        if crash:
            steps[len(steps) // 2].fn = _crash
        self.segments = [FakeSegment(self, "inputs", plan[0], self._inputs), *steps,
                         FakeSegment(self, "output", plan[-1], self._download)]

    def _inputs(self) -> None:  # on the launching thread, as the engine's noise draw
        self.noise = self.policy._draw()

    def _download(self) -> None:
        self._out = self._actions + np.float32(self.noise)

    def cancel(self) -> None:
        if self.launched == 0 and not self._cancelled:
            self._cancelled = True
            self.policy._unstage()

    def result(self) -> dict:
        if self._out is None:
            raise RuntimeError("FakeJob.result() before its output segment ran")
        return {"actions": self._out.copy()}


def _crash() -> None:  # an unexpected failure inside the model, while its segments run
    raise ZeroDivisionError("the fake model divided by zero")


class FakePolicy:
    """actions[h, j] = state[j % state_dim] + marker (+ the noise draw: 0 unless `noisy`), for every h.

    plan: each segment's duration in ms, inputs first and output last (default: 5 segments sharing
    `infer_s`). noisy: like the engine's noise generator, each launched job draws the next number
    (1, 2, ...) and reset() restarts the sequence, so a test sees how resets and launches were ordered."""

    def __init__(self, config: Any, marker: float, infer_s: float = 0.0, plan: list[float] | None = None,
                 noisy: bool = False, trace: list | None = None):
        self.spec = PolicySpec(  # the engine's own spec type, so the runtime sees exactly what it serves
            name=config.name, kind=config.kind, cameras=tuple(c.name for c in config.cameras),
            optional_cameras=tuple(c.name for c in config.cameras if c.optional), image_size=(224, 224),
            state_dim=config.state_dim, action_horizon=config.action_horizon or 10, action_dim=config.action_dim,
            prompt="text or tokens", default_prompt=config.prompt, max_prompt_tokens=48, prompt_buckets=(48,),
            num_steps=config.num_steps, precision="fp32", device="cpu", platform="cpu", cuda_graphs=False,
            random_weights=True, checkpoint="random", normalization="none")
        self.marker = marker
        self.plan = plan or [infer_s * 1e3 / 5] * 5
        self.slowdown = 1.0
        self.noisy = noisy
        self.trace = trace if trace is not None else []
        self.calls = 0  # jobs prepared
        self.resets = 0
        self.staged = 0  # jobs prepared and not launched (at most two)
        self.prepared_at: list[float] = []
        self._noise = 0
        self._launching = threading.Lock()
        self._preparing = threading.Lock()
        self._count = threading.Lock()  # `staged` changes on the preparing and the launching thread

    def infer(self, obs: dict) -> dict:
        job = self.prepare(obs)
        for seg in job.segments:
            seg.launch()
        return job.result()

    def reset(self) -> None:
        self.resets += 1
        self._noise = 0

    def _draw(self) -> int:
        self._noise += 1
        return self._noise if self.noisy else 0

    def _unstage(self) -> None:
        with self._count:
            self.staged -= 1

    def prepare(self, obs: dict) -> FakeJob:
        if not self._preparing.acquire(blocking=False):
            raise RuntimeError("FakePolicy.prepare called from two threads at once")
        try:
            job = self._prepare(obs)
            self.prepared_at.append(time.perf_counter())
            return job
        finally:
            self._preparing.release()

    def _prepare(self, obs: dict) -> FakeJob:
        spec = self.spec
        if not isinstance(obs, dict) or not isinstance(obs.get("images"), dict):
            raise InputError("observation.images must be a mapping of camera name -> uint8 [H, W, 3] image")
        for cam in spec.cameras:
            if cam not in spec.optional_cameras and cam not in obs["images"]:
                raise InputError(f"observation.images: camera {cam!r} is missing")
        for cam, image in obs["images"].items():
            if cam not in spec.cameras:
                raise InputError(f"observation.images: unknown camera {cam!r}")
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InputError(f"observation.images[{cam!r}] must be uint8 [H, W, 3]")
        try:
            state = np.asarray(obs.get("state"), dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError("observation.state must be numbers") from None
        if state.shape != (spec.state_dim,):
            raise InputError(f"state: expected shape [{spec.state_dim}], got {list(state.shape)}")
        with self._count:
            if self.staged >= 2:
                raise RuntimeError("two jobs of this policy are prepared and not launched: launch one first")
            self.staged += 1
        self.calls += 1
        row = state[np.arange(spec.action_dim) % spec.state_dim].astype(np.float32) + np.float32(self.marker)
        return FakeJob(self, np.tile(row, (spec.action_horizon, 1)), crash=obs.get("prompt") == "crash")


class FakeLoader:
    """A `loader` for Server: each load makes a FakePolicy whose marker is 1000 x the load number.

    `load_s` makes loading slow (as a GPU capture is); `fail` makes the next loads raise it.
    `plans`: model name -> segment durations (ms) for that model; `trace`: every launch of every model.
    """

    def __init__(self, load_s: float = 0.0, infer_s: float = 0.0, plans: dict[str, list[float]] | None = None,
                 noisy: bool = False):
        self.load_s = load_s
        self.infer_s = infer_s
        self.plans = plans or {}
        self.noisy = noisy
        self.fail: Exception | None = None
        self.policies: list[FakePolicy] = []
        self.trace: list = []  # (model, segment, start, end) of every launch, warm-ups included

    def __call__(self, config: Any) -> FakePolicy:
        if self.load_s:
            time.sleep(self.load_s)
        if self.fail is not None:
            raise self.fail
        if config.checkpoint.startswith("/nonexistent"):
            raise CheckpointError(f"checkpoint {config.checkpoint!r}: no such folder")
        policy = FakePolicy(config, marker=1000.0 * (len(self.policies) + 1), infer_s=self.infer_s,
                            plan=self.plans.get(config.name), noisy=self.noisy, trace=self.trace)
        self.policies.append(policy)
        return policy

    def latest(self, name: str) -> FakePolicy:
        return [p for p in self.policies if p.spec.name == name][-1]


def model_dict(name: str = "demo", **overrides: Any) -> dict:
    """A `models:` entry shaped like configs/demo.yaml's."""
    entry = {"name": name, "kind": "pi05", "checkpoint": "random", "device": "cpu", "tokenizer": "bytes",
             "cameras": ["base_0_rgb", "left_wrist_0_rgb", {"name": "right_wrist_0_rgb", "optional": True}],
             "state_dim": 8, "action_dim": 7, "action_horizon": 10, "prompt": "pick up the red cube"}
    entry.update(overrides)
    return entry


def deployment(*models: dict, **server: Any) -> DeploymentConfig:
    """A deployment on free loopback ports (`*`), so tests can run in parallel."""
    server.setdefault("bind", "tcp://127.0.0.1:*")
    server.setdefault("publish_bind", "tcp://127.0.0.1:*")
    server.setdefault("observe_bind", "tcp://127.0.0.1:*")
    return parse_deployment({"server": server, "models": list(models) or [model_dict()]}, "test config")


def observation(state_value: float = 0.0, size: int = 224, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": {"base_0_rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                       "left_wrist_0_rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)},
            "state": np.arange(8, dtype=np.float32) + np.float32(state_value)}


def periodic(name: str, period_ms: float, **schedule: Any) -> dict:
    """A `models:` entry of a periodic model (as model_dict's) released every `period_ms`."""
    return model_dict(name, schedule={"trigger": "periodic", "period_ms": period_ms, **schedule})


def first_chunk(pub: Any, sub: Any, model: str, obs: dict, seconds: float = 5.0) -> dict:
    """Publish `obs` until the model's stream answers: new PUB/SUB connections take a moment to
    carry messages (ZeroMQ's slow joiner). Returns the first action chunk."""
    deadline = time.monotonic() + seconds
    while True:
        pub.publish(model, obs)
        try:
            return sub.recv(timeout_ms=50)
        except TimeoutError:
            assert time.monotonic() < deadline, f"no action chunk for {model!r} within {seconds} s"
