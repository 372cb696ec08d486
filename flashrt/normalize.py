"""State and action normalization: statistics from the checkpoint (or the config), as affine maps.

Every supported mode is affine per dimension, so (un)normalizing is `(x - sub) * scale + add` and the
engine applies it on the device in two small ops (Pi0's state, every action chunk). Subtracting first
keeps a degenerate dimension (q01 == q99, a scale of 1e8) exact in float32. Where the statistics
come from decides the epsilon, as in the code that trained the model:

| source                          | mean/std                     | quantile (q01/q99)                     |
|---------------------------------|------------------------------|----------------------------------------|
| openpi `assets/*/norm_stats.json`| (x - mean) / (std + 1e-6)   | (x - q01) / (q99 - q01 + 1e-6) * 2 - 1 |
| LeRobot processor safetensors   | (x - mean) / (std + 1e-8)    | 2 (x - q01) / (q99 - q01) - 1 (1e-8 if equal) |

Dimensions beyond the statistics pass through unchanged (openpi pads stats with identity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import NormalizationConfig
from .errors import CheckpointError, ConfigError

LEROBOT_MODES = {"MEAN_STD": "mean_std", "QUANTILES": "quantile", "IDENTITY": "identity"}


@dataclass
class Affine:
    """y = (x - sub) * scale + add, per dimension (float32 vectors)."""

    sub: np.ndarray
    scale: np.ndarray
    add: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[-1]
        return ((x - self.sub[:n]) * self.scale[:n] + self.add[:n]).astype(np.float32)

    def rows(self) -> np.ndarray:
        """[3, dim]: sub, scale, add (the engine's device layout)."""
        return np.stack([self.sub, self.scale, self.add]).astype(np.float32)

    @staticmethod
    def identity(dim: int) -> "Affine":
        return Affine(np.zeros(dim, np.float32), np.ones(dim, np.float32), np.zeros(dim, np.float32))


@dataclass
class Normalization:
    state: Affine  # raw state -> model space
    actions: Affine  # model space -> raw actions
    source: str  # what the statistics came from, for the policy spec


def affine(stats: dict[str, np.ndarray], mode: str, style: str, dim: int, inverse: bool) -> Affine:
    """The (un)normalizing map of `stats` for a vector of `dim`, padded with identity."""
    out = Affine.identity(dim)
    if mode == "identity":
        return out
    need = ("mean", "std") if mode == "mean_std" else ("q01", "q99")
    missing = [k for k in need if k not in stats]
    if missing:
        raise CheckpointError(f"{mode} normalization needs statistics {list(need)}; missing {missing}")
    a, b = (np.asarray(stats[k], np.float64) for k in need)
    n = min(dim, len(a))
    a, b = a[:n], b[:n]
    if mode == "mean_std":
        denom = b + (1e-6 if style == "openpi" else 1e-8)
        lo, width = a, denom  # x_norm = (x - lo) / width
        shift = 0.0
    else:
        span = b - a
        span = span + 1e-6 if style == "openpi" else np.where(span == 0, 1e-8, span)
        lo, width, shift = a, span / 2, -1.0  # x_norm = (x - q01) / (span / 2) - 1
    if inverse:  # x = (x_norm - shift) * width + lo
        out.sub[:n], out.scale[:n], out.add[:n] = shift, width, lo
    else:  # x_norm = (x - lo) / width + shift
        out.sub[:n], out.scale[:n], out.add[:n] = lo, 1 / width, shift
    return out


def _lerobot_stats(folder: Path) -> tuple[dict, dict] | None:
    from safetensors.numpy import load_file

    pre = sorted(folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    post = sorted(folder.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"))
    if not pre and not post:
        return None
    tensors: dict[str, np.ndarray] = {}
    for f in pre + post:
        tensors.update(load_file(str(f)))

    def group(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    return group("observation.state."), group("action.")


def _openpi_stats(folder: Path, asset_id: str | None) -> tuple[dict, dict, str] | None:
    files = sorted(folder.glob("assets/*/norm_stats.json"))
    if asset_id is not None:
        files = [f for f in files if f.parent.name == asset_id]
        if not files:
            raise ConfigError(f"normalization.asset_id: {folder}/assets/{asset_id}/norm_stats.json does not exist")
    if not files:
        return None
    if len(files) > 1:
        raise ConfigError(f"normalization.asset_id: {folder}/assets holds several norm_stats.json "
                          f"({', '.join(f.parent.name for f in files)}); say which one")
    try:
        stats = json.loads(files[0].read_text())["norm_stats"]
        return stats.get("state", {}), stats.get("actions", {}), str(files[0])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{files[0]}: not an openpi norm_stats.json ({e!r})") from None


def _read_file(path: Path) -> tuple[dict, dict, str]:
    """A norm_stats.json file, or a folder with LeRobot processor files or openpi assets."""
    if path.is_file():
        try:
            stats = json.loads(path.read_text())
            stats = stats.get("norm_stats", stats)
            return stats.get("state", {}), stats.get("actions", {}), "openpi"
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"normalization.source: cannot read {path} as norm_stats.json ({e})") from None
    found = _lerobot_stats(path)
    if found:
        return found[0], found[1], "lerobot"
    found = _openpi_stats(path, None)
    if found:
        return found[0], found[1], "openpi"
    raise ConfigError(f"normalization.source: {path} holds no LeRobot normalizer files and no assets/*/norm_stats.json")


def load(cfg: NormalizationConfig, folder: Path | None, kind: str, mapping: dict | None,
         state_dim: int, action_dim: int) -> Normalization:
    """Resolve the statistics and mode of a model (see the module docstring for the rules)."""
    style, source = "openpi", "none"
    state_stats: dict = {}
    action_stats: dict = {}
    if cfg.source == "auto" and folder is not None:
        lr = _lerobot_stats(folder)
        if lr is not None:
            state_stats, action_stats = lr
            style, source = "lerobot", f"{folder} (LeRobot processor)"
        else:
            op = _openpi_stats(folder, cfg.asset_id)
            if op is not None:
                state_stats, action_stats, source = op
    elif cfg.source not in ("auto", "none"):
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise ConfigError(f"normalization.source: {path} does not exist")
        state_stats, action_stats, style = _read_file(path)
        source = str(path)
    if cfg.state is not None or cfg.actions is not None:
        state_stats = cfg.state if cfg.state is not None else state_stats
        action_stats = cfg.actions if cfg.actions is not None else action_stats
        source, style = "config", "openpi"

    modes = {"state": cfg.mode, "actions": cfg.mode}
    if cfg.mode == "auto":
        default = "mean_std" if kind == "pi0" else "quantile"
        for ours, theirs in (("state", "STATE"), ("actions", "ACTION")):
            lr_mode = (mapping or {}).get(theirs)
            if lr_mode is not None and lr_mode not in LEROBOT_MODES:
                raise CheckpointError(f"normalization mode {lr_mode} (config.json normalization_mapping) "
                                      f"is not supported; supported: {', '.join(LEROBOT_MODES)}")
            modes[ours] = LEROBOT_MODES.get(lr_mode, default)
    if source == "none":
        modes = {"state": "identity", "actions": "identity"}
    for name, stats in (("state", state_stats), ("actions", action_stats)):
        if modes[name] != "identity" and not stats:
            raise CheckpointError(f"{source}: no {name} statistics for {modes[name]} normalization")
    return Normalization(state=affine(state_stats, modes["state"], style, state_dim, inverse=False),
                         actions=affine(action_stats, modes["actions"], style, action_dim, inverse=True),
                         source=source)
