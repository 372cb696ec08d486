"""Typed configuration: YAML mappings parsed into dataclasses, with errors that name the key.

`parse(cls, data, where)` is the one loader for every config in the project (model configs here,
the runtime's deployment config too). It checks each key against the dataclass's type hints,
refuses unknown keys, and calls a dataclass's `validate(where)` for value checks, so an error
always reads like `configs/demo.yaml: models[0].action_horizon: expected an int >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError

# ---------------------------------------------------------------------------------------------
# The generic loader


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is type(None):
        return "null"
    return {int: "an int", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and hasattr(tp, "from_str"):
            return tp.from_str(value, where)
        return parse(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config loader has no rule for {tp}")  # a bug in a dataclass, not in a file


def parse(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key. `where` prefixes error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected {_type_name(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key {unknown[0]!r} (expected one of: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key_where = f"{where}.{name}"
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key_where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_where}: required key is missing (expected {_type_name(hints[name])})")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def check(cond: bool, where: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{where}: expected {expected}, got {got!r}")


# ---------------------------------------------------------------------------------------------
# The model schema

KINDS = ("pi0", "pi05")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8", "int8")


@dataclass
class CameraConfig:
    """A camera slot. `optional: true` cameras may be absent from an observation (then masked)."""

    name: str
    optional: bool = False

    @classmethod
    def from_str(cls, value: str, where: str) -> "CameraConfig":
        return cls(name=value)


@dataclass
class RandomWeights:
    """For `checkpoint: random`: seeded random weights of a given size, for demos and benchmarks."""

    seed: int = 0
    size: Literal["tiny", "small", "full"] = "tiny"


@dataclass
class NormalizationConfig:
    """Where state/action statistics come from, and how they are applied.

    source: `auto` (the checkpoint's LeRobot processor files or openpi `assets/*/norm_stats.json`),
    `none` (identity), or a path to a norm_stats.json / LeRobot checkpoint folder.
    `state` / `actions` override the statistics: {mean, std} or {q01, q99} lists.
    """

    source: str = "auto"
    asset_id: str | None = None
    mode: Literal["auto", "mean_std", "quantile", "identity"] = "auto"
    state: dict[str, list[float]] | None = None
    actions: dict[str, list[float]] | None = None

    def validate(self, where: str) -> None:
        for name, stats in (("state", self.state), ("actions", self.actions)):
            if stats is None:
                continue
            keys = set(stats)
            check(keys in ({"mean", "std"}, {"q01", "q99"}), f"{where}.{name}",
                  "keys {mean, std} or {q01, q99}", sorted(keys))
            lengths = {len(v) for v in stats.values()}
            check(len(lengths) == 1, f"{where}.{name}", "lists of one length", {k: len(v) for k, v in stats.items()})


@dataclass
class CalibrationConfig:
    """Quantized precisions (fp8, int8): where activation ranges come from, and the accuracy bar."""

    observations: str | None = None  # folder of .npz observations; default: synthetic ones
    count: int = 8  # synthetic observations
    refresh: bool = False  # recompute the scales even when the cache has them
    min_cosine: float = 0.99  # refuse to serve below this cosine to bf16 on a calibration observation
    # Projections left in bf16: fnmatch patterns over their names (`vision.3.fc1`, `vlm.*.o`, `expert.*`);
    # unset: the precision's default (quant.KEEP_BF16)
    keep_bf16: list[str] | None = None
    # FP8 weight scales: one per tensor (cuBLASLt's FP8 GEMM, bias fused) or one per output channel
    # (a row-wise-scaled GEMM, slower at batch 1)
    fp8_weight_scales: str = "tensor"

    def validate(self, where: str) -> None:
        check(self.fp8_weight_scales in ("tensor", "channel"), f"{where}.fp8_weight_scales", "'tensor' or 'channel'",
              self.fp8_weight_scales)
        check(1 <= self.count <= 1000, f"{where}.count", "an int in 1..1000", self.count)
        check(0.0 <= self.min_cosine <= 1.0, f"{where}.min_cosine", "a number in [0, 1]", self.min_cosine)


@dataclass
class ModelConfig:
    """One model to serve. See docs/configuration.md for every key."""

    name: str
    kind: Literal["pi0", "pi05"]
    checkpoint: str
    cameras: list[CameraConfig]
    state_dim: int
    action_dim: int
    revision: str | None = None
    random: RandomWeights = field(default_factory=RandomWeights)
    action_horizon: int | None = None
    num_steps: int = 10
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp8", "int8"] = "auto"
    device: str = "auto"
    prompt: str | None = None
    tokenizer: str | None = None
    max_prompt_tokens: int | None = None
    prompt_buckets: list[int] | None = None
    discrete_state: bool | None = None
    cuda_graphs: bool = True
    prefix_segments: int = 3  # the prefix's layers as this many segments (finer interleaving of models)
    kernels: Literal["auto", "torch"] = "auto"  # "torch": never use flashrt._kernels (debugging, A/B runs)
    attention: Literal["auto", "flash_varlen", "sdpa"] = "auto"  # override the platform's attention choice
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self, where: str) -> None:
        check(bool(self.name) and self.name.replace("_", "").replace("-", "").replace(".", "").isalnum(),
              f"{where}.name", "a name of letters, digits, '_', '-' or '.'", self.name)
        check(bool(self.checkpoint), f"{where}.checkpoint", "a local folder, a Hub id or 'random'", self.checkpoint)
        check(len(self.cameras) >= 1, f"{where}.cameras", "at least one camera", self.cameras)
        names = [c.name for c in self.cameras]
        check(len(set(names)) == len(names), f"{where}.cameras", "unique camera names", names)
        check(any(not c.optional for c in self.cameras), f"{where}.cameras", "at least one camera that is not optional", names)
        check(1 <= self.state_dim <= 32, f"{where}.state_dim", "an int in 1..32", self.state_dim)
        check(1 <= self.action_dim <= 32, f"{where}.action_dim", "an int in 1..32", self.action_dim)
        if self.action_horizon is not None:
            check(1 <= self.action_horizon <= 256, f"{where}.action_horizon", "an int in 1..256", self.action_horizon)
        check(1 <= self.num_steps <= 100, f"{where}.num_steps", "an int in 1..100", self.num_steps)
        check(1 <= self.prefix_segments <= 18, f"{where}.prefix_segments", "an int in 1..18", self.prefix_segments)
        if self.max_prompt_tokens is not None:
            check(1 <= self.max_prompt_tokens <= 1024, f"{where}.max_prompt_tokens", "an int in 1..1024",
                  self.max_prompt_tokens)
        if self.prompt_buckets is not None:
            b = self.prompt_buckets
            check(len(b) >= 1 and all(x >= 1 for x in b) and b == sorted(set(b)), f"{where}.prompt_buckets",
                  "increasing positive ints", b)
            if self.max_prompt_tokens is not None:
                check(b[-1] == self.max_prompt_tokens, f"{where}.prompt_buckets",
                      f"a last bucket equal to max_prompt_tokens ({self.max_prompt_tokens})", b)
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), f"{where}.device",
              "'auto', 'cpu' or 'cuda[:N]'", self.device)
        if self.discrete_state is not None and self.kind != "pi05":
            raise ConfigError(f"{where}.discrete_state: only Pi0.5 (kind: pi05) writes the state into the prompt")


def load_model_config(source: Any, name: str | None = None) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a mapping, or a YAML file holding one model or a `models` list."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, dict):
        return parse(ModelConfig, source, "config")
    path = Path(source)
    data = read_yaml(path)
    if "models" not in data:
        return parse(ModelConfig, data, str(path))
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{path}: models: expected a non-empty list of model configs")
    if name is None and len(models) > 1:
        raise ConfigError(f"{path}: holds {len(models)} models; say which one (name=...)")
    for i, m in enumerate(models):
        if name is None or (isinstance(m, dict) and m.get("name") == name):
            return parse(ModelConfig, m, f"{path}: models[{i}]")
    raise ConfigError(f"{path}: no model named {name!r}")
