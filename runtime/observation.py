"""From a request's `data` to the engine's observation, and from the action chunk back to a reply.

The engine checks the observation against the model (cameras, dtypes, shapes, state size) and raises
InputError naming the field; this module checks only what the wire adds: unknown keys (a misspelled
`promt` would otherwise be ignored silently) and Isaac-GR00T's key mapping. Needs only numpy: the
client uses `synthetic_observation` too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .protocol import BAD_INPUT, ProtocolError

DATA_KEYS = ("images", "state", "prompt", "prompt_tokens")


def _fail(message: str) -> ProtocolError:
    return ProtocolError(BAD_INPUT, message)


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {list(x.shape)}"
    return type(x).__name__


def observation(data: Any) -> dict:
    """The engine observation of a native `infer` request: {images, state, prompt?, prompt_tokens?}."""
    if not isinstance(data, dict):
        raise _fail(f"data: expected a map {{images, state, prompt?}}, got {_describe(data)}")
    for key in data:
        if key not in DATA_KEYS:
            raise _fail(f"data: unknown key {key!r} (expected: {', '.join(DATA_KEYS)})")
    return data


# ---------------------------------------------------------------------------------------------
# Isaac-GR00T clients: {"observation": {"video": {cam: [B,T,H,W,3]}, "state": {group: [B,T,D]},
# "language": {"annotation.…": [[str]]}}} or the same with flat "video.cam" / "state.group" keys.


def _flatten_groot(obs: dict) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obs.items():
        if key in ("video", "state") and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif key == "language" and isinstance(value, dict):
            flat.update(value)  # GR00T language keys already carry their full name (annotation.…)
        else:
            flat[key] = value
    return flat


def _latest(x: Any, ndim: int, where: str) -> np.ndarray:
    """Drop GR00T's leading [batch, time] dims: batch must be 1; of several frames the last is newest."""
    if not isinstance(x, np.ndarray) or x.ndim < ndim:
        raise _fail(f"{where}: expected an array with at least {ndim} dims, got {_describe(x)}")
    lead = x.shape[: x.ndim - ndim]
    if len(lead) >= 2 and lead[0] != 1:
        raise _fail(f"{where}: batch size must be 1, got shape {list(x.shape)}")
    return x.reshape(-1, *x.shape[x.ndim - ndim:])[-1] if lead else x


def groot_observation(obs: Any, mapping: Any, required_cameras: frozenset[str]) -> dict:
    """The engine observation for an Isaac-GR00T `get_action` request, through the config's mapping."""
    if not isinstance(obs, dict):
        raise _fail(f"data.observation: expected a map, got {_describe(obs)}")
    flat = _flatten_groot(obs)
    images = {}
    for key, camera in mapping.video.items():
        if key in flat:
            images[camera] = _latest(flat[key], 3, f"observation.{key}")
        elif camera in required_cameras:
            raise _fail(f"observation: missing {key!r} (mapped to camera {camera!r}); keys sent: {sorted(flat)}")
    states = []
    for key in mapping.state:
        if key not in flat:
            raise _fail(f"observation: missing {key!r} (the state is {' + '.join(mapping.state)}); keys sent: {sorted(flat)}")
        states.append(np.asarray(_latest(flat[key], 1, f"observation.{key}"), dtype=np.float32))
    data: dict[str, Any] = {"images": images, "state": np.concatenate(states)}
    text = flat.get(mapping.language)
    while isinstance(text, (list, tuple)) and len(text) == 1:  # [[str]] (batch, time) -> str
        text = text[0]
    if text is not None:
        data["prompt"] = text
    return data


def groot_reply(actions: np.ndarray, mapping: Any) -> list:
    """Isaac-GR00T N1.6's reply: [action dict of [1, H, D_group] arrays, info dict]."""
    out, start = {}, 0
    for group, width in mapping.actions.items():
        out[group] = actions[None, :, start:start + width]
        start += width
    return [out, {}]


# ---------------------------------------------------------------------------------------------
# Metadata and synthetic observations, both from a PolicySpec's `to_dict()`


def image_hw(spec: dict) -> tuple[int, int]:
    size = spec.get("image_size") or 224
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def describe_io(spec: dict) -> dict:
    """The `metadata` endpoint's inputs and outputs of one model."""
    optional = set(spec.get("optional_cameras") or ())
    h, w = image_hw(spec)
    return {
        "inputs": {
            "images": {cam: {"dtype": "uint8", "shape": [h, w, 3], "any_size": True, "optional": cam in optional}
                       for cam in list(spec["cameras"]) + [c for c in optional if c not in spec["cameras"]]},
            "state": {"dtype": "float32", "shape": [spec["state_dim"]]},
            "prompt": {"type": "str", "optional": True, "default": spec.get("default_prompt")},
        },
        "outputs": {"actions": {"dtype": "float32", "shape": [spec["action_horizon"], spec["action_dim"]]}},
    }


def synthetic_observation(spec: dict, rng: np.random.Generator | None = None) -> dict:
    """Random images of the model's size for its required cameras and a random state (no prompt)."""
    rng = rng or np.random.default_rng(0)
    optional = set(spec.get("optional_cameras") or ())
    h, w = image_hw(spec)
    return {
        "images": {cam: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                   for cam in spec["cameras"] if cam not in optional},
        "state": rng.standard_normal(spec["state_dim"]).astype(np.float32),
    }
