"""The deployment config: one YAML file with a `server:` section and a `models:` list.

Parsed with flashrt's typed loader (`flashrt.config.parse`), so unknown keys are refused and every
error names the file and the key. A served model is the engine's `ModelConfig` plus runtime-only
keys (how the scheduler treats it; how Isaac-GR00T clients' keys map onto it); the engine gets only
its own schema.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flashrt.config import ModelConfig, check, parse, read_yaml
from flashrt.errors import ConfigError

DEFAULT_BIND = "tcp://0.0.0.0:5555"  # LAN-reachable: a robot on the network can connect
# Periodic models' streams: action chunks out (PUB), observations in (SUB). Bound only once a periodic
# model is served, so a deployment without one opens no extra ports.
DEFAULT_PUBLISH_BIND = "tcp://0.0.0.0:5556"
DEFAULT_OBSERVE_BIND = "tcp://0.0.0.0:5557"
ENDPOINT_PREFIXES = ("tcp://", "ipc://", "inproc://")


@dataclass
class CurveConfig:
    """CURVE encryption and authentication (ZeroMQ's Ironhouse pattern).

    secret_key: the server's certificate file holding its secret key (`NAME.key_secret`, as written by
    `zmq.auth.create_certificates`); clients need the matching public key (`NAME.key`).
    clients: a folder of the allowed clients' public certificates (`*.key`); a client whose key is
    not there gets no connection. null: any client that knows the server's public key (encryption only).
    """

    secret_key: str
    clients: str | None = None


@dataclass
class ServerConfig:
    bind: str | list[str] = DEFAULT_BIND
    max_message_bytes: int = 64 << 20  # a larger request is refused (too_large) before it is decoded
    max_queue: int = 64  # requests waiting for one model before new ones are refused (busy)
    admin_token: str | None = None  # needed by `load` / `unload`; null disables them. Env FLASHRT_ADMIN_TOKEN overrides
    curve: CurveConfig | None = None
    stats_window: int = 10_000  # latency percentiles are over this many most recent requests per model
    publish_bind: str = DEFAULT_PUBLISH_BIND  # PUB: periodic models' action chunks, topic = model name
    observe_bind: str = DEFAULT_OBSERVE_BIND  # SUB: observations for periodic models, topic = model name
    # Segments launched on the GPU ahead of completion. 2 keeps the GPU fed while the scheduler
    # decides; more adds to how long an urgent request waits behind work already launched.
    scheduler_depth: int = 2

    @property
    def binds(self) -> list[str]:
        return [self.bind] if isinstance(self.bind, str) else list(self.bind)

    def validate(self, where: str) -> None:
        check(len(self.binds) >= 1, f"{where}.bind", "at least one endpoint", self.bind)
        for b in self.binds:
            check(b.startswith(ENDPOINT_PREFIXES), f"{where}.bind",
                  "endpoints like tcp://0.0.0.0:5555 or ipc:///tmp/flashrt.sock", b)
        for key, example in (("publish_bind", DEFAULT_PUBLISH_BIND), ("observe_bind", DEFAULT_OBSERVE_BIND)):
            value = getattr(self, key)
            check(value.startswith(ENDPOINT_PREFIXES), f"{where}.{key}", f"an endpoint like {example}", value)
            check(value not in self.binds or value.endswith(":*"), f"{where}.{key}",  # `*`: any free port
                  "an endpoint other than server.bind's", value)
        check(self.publish_bind != self.observe_bind or self.observe_bind.endswith(":*"), f"{where}.observe_bind",
              "an endpoint other than publish_bind", self.observe_bind)
        check(1 <= self.scheduler_depth <= 8, f"{where}.scheduler_depth", "an int in 1..8", self.scheduler_depth)
        check(1 << 10 <= self.max_message_bytes <= 1 << 31, f"{where}.max_message_bytes",
              "a size in bytes between 1 KiB and 2 GiB", self.max_message_bytes)
        check(self.max_queue >= 1, f"{where}.max_queue", "an int >= 1", self.max_queue)
        check(self.admin_token is None or len(self.admin_token) >= 8, f"{where}.admin_token",
              "a string of at least 8 characters, or null", "<hidden>")
        check(self.stats_window >= 10, f"{where}.stats_window", "an int >= 10", self.stats_window)


@dataclass
class GrootMapping:
    """How an Isaac-GR00T policy client's observation maps onto this model, and its reply back.

    video: GR00T video key -> camera name, e.g. {video.ego_view: base_0_rgb}.
    state: GR00T state keys, concatenated in this order into the state vector.
    language: the GR00T key holding the task text (becomes the prompt).
    actions: reply action groups -> number of action columns, taken in order, e.g. {left_arm: 7, gripper: 1}.
    """

    video: dict[str, str]
    state: list[str]
    actions: dict[str, int]
    language: str = "annotation.human.task_description"

    def validate(self, where: str) -> None:
        check(len(self.video) >= 1, f"{where}.video", "at least one video key", self.video)
        check(len(self.state) >= 1, f"{where}.state", "at least one state key", self.state)
        check(len(self.actions) >= 1 and all(n >= 1 for n in self.actions.values()), f"{where}.actions",
              "groups with a column count >= 1", self.actions)


@dataclass
class ScheduleConfig:
    """How the scheduler treats a model's inferences (docs/protocol.md, Scheduling).

    Between segments, the GPU goes to the most urgent ready inference of all models: higher
    `priority` first, then the earliest deadline, then arrival. A request (or periodic release) with
    a deadline that cannot be met, given the work ahead of it, is refused with a `deadline` error.

    trigger: `request` (infer calls) or `periodic` (every `period_ms` on the newest observation
      published to the model; its actions are published; infer calls are refused).
    deadline_ms: relative deadline of each request, from its arrival (or each release); null: best
      effort, never refused.
    realtime: run on the high-priority CUDA stream; default: true when a deadline is set.
    """

    trigger: Literal["request", "periodic"] = "request"
    priority: int = 0
    deadline_ms: float | None = None
    period_ms: float | None = None
    realtime: bool | None = None

    @property
    def is_realtime(self) -> bool:
        return self.deadline_ms is not None if self.realtime is None else self.realtime

    @property
    def periodic(self) -> bool:
        return self.trigger == "periodic"

    def describe(self) -> dict:
        """For `metadata` and `models`: the settings in effect."""
        return {"trigger": self.trigger, "priority": self.priority, "deadline_ms": self.deadline_ms,
                "period_ms": self.period_ms, "realtime": self.is_realtime}

    def validate(self, where: str) -> None:
        check(-1000 <= self.priority <= 1000, f"{where}.priority", "an int in -1000..1000", self.priority)
        check(self.deadline_ms is None or 0 < self.deadline_ms <= 3_600_000, f"{where}.deadline_ms",
              "milliseconds > 0 (up to an hour), or null for best effort", self.deadline_ms)
        if self.periodic:
            check(self.period_ms is not None and 1 <= self.period_ms <= 3_600_000, f"{where}.period_ms",
                  "milliseconds >= 1 (required with trigger: periodic)", self.period_ms)
        else:
            check(self.period_ms is None, f"{where}.period_ms", "no period unless trigger is periodic", self.period_ms)


@dataclass
class ServedModelConfig(ModelConfig):
    """A `models:` entry: the engine's model schema plus runtime-only keys."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # none given: best effort, on request
    groot: GrootMapping | None = None

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.groot is not None:
            cameras = [c.name for c in self.cameras]
            for key, cam in self.groot.video.items():
                check(cam in cameras, f"{where}.groot.video.{key}", f"one of the model's cameras {cameras}", cam)
            columns = sum(self.groot.actions.values())
            check(columns <= self.action_dim, f"{where}.groot.actions",
                  f"at most action_dim ({self.action_dim}) columns in all", columns)

    def engine_config(self) -> ModelConfig:
        """The engine's part of this entry: exactly flashrt's ModelConfig."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


@dataclass
class DeploymentConfig:
    server: ServerConfig
    models: list[ServedModelConfig]
    path: Path | None = None


def parse_model(data: Any, where: str) -> ServedModelConfig:
    return parse(ServedModelConfig, data, where)


def parse_deployment(data: dict, where: str, base: Path | None = None) -> DeploymentConfig:
    """A DeploymentConfig from a mapping; relative key-file paths are taken from `base`."""
    unknown = sorted(set(map(str, data)) - {"server", "models"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected: server, models)")
    server = parse(ServerConfig, data.get("server") or {}, f"{where}: server")
    models_data = data.get("models")
    if not isinstance(models_data, list) or not models_data:
        raise ConfigError(f"{where}: models: expected a non-empty list of model configs")
    models = [parse_model(m, f"{where}: models[{i}]") for i, m in enumerate(models_data)]
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: models: the name {dupes[0]!r} is used twice; names must be unique")
    if server.curve is not None and base is not None:
        server.curve = CurveConfig(
            secret_key=str(base / server.curve.secret_key),
            clients=None if server.curve.clients is None else str(base / server.curve.clients),
        )
    return DeploymentConfig(server=server, models=models)


def load_deployment(path: str | os.PathLike) -> DeploymentConfig:
    path = Path(path)
    config = parse_deployment(read_yaml(path), str(path), base=path.parent)
    config.path = path
    return config
