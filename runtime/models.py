"""Loading a model for serving: build the engine, then warm it before it takes any request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .config import ServedModelConfig
from .observation import synthetic_observation

Loader = Callable[[ServedModelConfig], Any]  # config -> policy (spec, infer, reset; prepare -> Job to be interleaved)


def flashrt_loader(config: ServedModelConfig) -> Any:
    import flashrt  # imported here: torch and the engine stay out of anything that only talks protocol

    return flashrt.load(config.engine_config())


@dataclass(eq=False)
class LoadedModel:
    config: ServedModelConfig
    policy: Any
    spec: dict  # policy.spec.to_dict(), for `metadata`
    required_cameras: frozenset[str]  # for Isaac-GR00T requests' own error messages
    load_s: float
    loaded_at: float  # time.time()
    generation: int = 0  # set by the server: +1 for every successful load, so a swap is visible to clients


# Warm-up inferences at load. Two: flashrt stages inputs in two alternating pinned slots that
# allocate their buffers on first use, and a pinned allocation while serving is slow and holds up
# the other threads' CUDA calls (the scheduler's launches among them).
WARMUP_CALLS = 2


def load_model(config: ServedModelConfig, loader: Loader) -> LoadedModel:
    """Load, capture and run the warm-up inferences; raises (FlashRTError etc.) if any step fails."""
    t0 = time.perf_counter()
    policy = loader(config)
    spec = policy.spec.to_dict()
    # The first calls pay one-time costs (allocation, lazy init); pay them here, not on a robot's request.
    for _ in range(WARMUP_CALLS):
        actions = np.asarray(policy.infer(synthetic_observation(spec))["actions"])
    expected = (spec["action_horizon"], spec["action_dim"])
    if actions.shape != expected:
        raise RuntimeError(f"model {config.name!r}: warm-up returned actions of shape {list(actions.shape)}, "
                           f"its spec says {list(expected)}")
    policy.reset()
    return LoadedModel(config=config, policy=policy, spec=spec,
                       required_cameras=frozenset(c.name for c in config.cameras if not c.optional),
                       load_s=time.perf_counter() - t0, loaded_at=time.time())
