"""Test helpers for the runtime: a fake policy with the engine's interface, and deployment configs.

The fake answers at once and its actions are a function of the request's state (plus a marker that
changes with every load), so a test can tell which request and which model generation a reply is for.
It checks inputs the way the engine's contract says (InputError naming the field).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np

from flashrt.errors import CheckpointError, InputError
from runtime.config import DeploymentConfig, parse_deployment


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    name: str
    kind: str
    cameras: tuple[str, ...]
    optional_cameras: tuple[str, ...]
    image_size: tuple[int, int]
    state_dim: int
    action_horizon: int
    action_dim: int
    default_prompt: str | None
    max_prompt_tokens: int
    num_steps: int
    precision: str = "fp32"
    device: str = "cpu"
    platform: str = "cpu"
    random_weights: bool = True
    checkpoint: str = "random"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class FakePolicy:
    """actions[h, j] = state[j % state_dim] + marker, for every h."""

    def __init__(self, config: Any, marker: float, infer_s: float = 0.0):
        self.spec = FakeSpec(
            name=config.name, kind=config.kind, cameras=tuple(c.name for c in config.cameras),
            optional_cameras=tuple(c.name for c in config.cameras if c.optional), image_size=(224, 224),
            state_dim=config.state_dim, action_horizon=config.action_horizon or 10, action_dim=config.action_dim,
            default_prompt=config.prompt, max_prompt_tokens=48, num_steps=config.num_steps)
        self.marker = marker
        self.infer_s = infer_s
        self.calls = 0
        self.resets = 0
        self._busy = threading.Lock()

    def infer(self, obs: dict) -> dict:
        if not self._busy.acquire(blocking=False):  # the contract: one thread at a time
            raise RuntimeError("FakePolicy.infer called from two threads at once")
        try:
            spec = self.spec
            if not isinstance(obs.get("images"), dict):
                raise InputError("observation.images must be a mapping of camera name -> uint8 [H, W, 3] image")
            if obs.get("prompt") == "crash":  # an unexpected failure inside the model
                raise ZeroDivisionError("the fake model divided by zero")
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
            if self.infer_s:
                time.sleep(self.infer_s)
            self.calls += 1
            row = state[np.arange(spec.action_dim) % spec.state_dim].astype(np.float32) + np.float32(self.marker)
            return {"actions": np.tile(row, (spec.action_horizon, 1))}
        finally:
            self._busy.release()

    def reset(self) -> None:
        self.resets += 1


class FakeLoader:
    """A `loader` for Server: each load makes a FakePolicy whose marker is 1000 x the load number.

    `load_s` makes loading slow (as a GPU capture is); `fail` makes the next loads raise it.
    """

    def __init__(self, load_s: float = 0.0, infer_s: float = 0.0):
        self.load_s = load_s
        self.infer_s = infer_s
        self.fail: Exception | None = None
        self.policies: list[FakePolicy] = []

    def __call__(self, config: Any) -> FakePolicy:
        if self.load_s:
            time.sleep(self.load_s)
        if self.fail is not None:
            raise self.fail
        if config.checkpoint.startswith("/nonexistent"):
            raise CheckpointError(f"checkpoint {config.checkpoint!r}: no such folder")
        policy = FakePolicy(config, marker=1000.0 * (len(self.policies) + 1), infer_s=self.infer_s)
        self.policies.append(policy)
        return policy


def model_dict(name: str = "demo", **overrides: Any) -> dict:
    """A `models:` entry shaped like configs/demo.yaml's."""
    entry = {"name": name, "kind": "pi05", "checkpoint": "random", "device": "cpu", "tokenizer": "bytes",
             "cameras": ["base_0_rgb", "left_wrist_0_rgb", {"name": "right_wrist_0_rgb", "optional": True}],
             "state_dim": 8, "action_dim": 7, "action_horizon": 10, "prompt": "pick up the red cube"}
    entry.update(overrides)
    return entry


def deployment(*models: dict, **server: Any) -> DeploymentConfig:
    """A deployment on a free loopback port (`*`), so tests can run in parallel."""
    server.setdefault("bind", "tcp://127.0.0.1:*")
    return parse_deployment({"server": server, "models": list(models) or [model_dict()]}, "test config")


def observation(state_value: float = 0.0, size: int = 224, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": {"base_0_rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                       "left_wrist_0_rgb": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)},
            "state": np.arange(8, dtype=np.float32) + np.float32(state_value)}
