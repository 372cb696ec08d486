"""FlashRT: realtime batch-1 inference of vision-language-action robot policies.

    policy = flashrt.load("configs/demo.yaml")
    out = policy.infer({"images": {...}, "state": ..., "prompt": "..."})
    out["actions"]  # float32 [action_horizon, action_dim]
"""

from __future__ import annotations

from .config import ModelConfig, load_model_config
from .errors import CheckpointError, ConfigError, FlashRTError, InputError, PlatformError

__version__ = "0.1.0"
__all__ = ["load", "ModelConfig", "FlashRTError", "ConfigError", "CheckpointError", "InputError", "PlatformError"]


def load(config, name: str | None = None):
    """Load a policy from a ModelConfig, a mapping, or a YAML file (one model, or `name` in a `models` list)."""
    from .policy import Policy

    return Policy(load_model_config(config, name))
