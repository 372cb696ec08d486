"""What prefetching the action expert's weights into L2 gains: the same models with the platform's
`l2_prefetch` off and on, loaded side by side (same random weights) and timed in interleaved rounds.

    python benchmarks/l2_prefetch.py   # writes benchmarks/results/l2_prefetch_<gpu>.json

Cases: Pi0.5 2 cameras in bf16 and FP8, Pi0 3 cameras in bf16 (10 steps, chunk 50, 48-token
prompt). Per case: graph replay p50 in 3 rounds each, and whether the two action chunks are
bit-identical for the same observation and noise (a prefetch is a hint: they must be). The FP8
policy with the prefetch reuses the calibration the first one made, so both run the same scales.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, platform_entry, replay_ab, save  # noqa: E402
from benchmarks.pi_latency import CAMS, observation  # noqa: E402

import flashrt  # noqa: E402
from flashrt import hardware  # noqa: E402

CASES = [("pi05", 2, "bf16"), ("pi05", 2, "fp8"), ("pi0", 3, "bf16")]
ROUNDS = 3


def load(kind: str, n_cams: int, precision: str, prefetch: bool):
    """A policy on this GPU with the L2 prefetch forced on or off (the platform table's entry)."""
    cfg = dict(name=kind, kind=kind, checkpoint="random", random={"seed": 0, "size": "full"},
               cameras=CAMS[:n_cams], state_dim=8, action_dim=7, precision=precision)
    if precision != "bf16" and not prefetch:
        cfg["calibration"] = {"refresh": True}
    with platform_entry(hardware._L2_PREFETCH, prefetch):
        policy = flashrt.load(cfg)
    assert policy.platform.l2_prefetch == prefetch
    return policy


def case(kind: str, n_cams: int, precision: str) -> dict:
    rng = np.random.default_rng(1)
    obs = observation(n_cams, 48, rng)
    noise = rng.normal(size=(50, 32)).astype(np.float32)
    policies = {"off": load(kind, n_cams, precision, False), "on": load(kind, n_cams, precision, True)}
    actions = {k: p.infer(obs, noise=noise)["actions"] for k, p in policies.items()}
    out = {**replay_ab(policies, obs, ROUNDS),
           "identical_actions": bool(np.array_equal(actions["off"], actions["on"]))}
    del policies
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    res = {"machine": machine(), "method": __doc__.split("\n\n")[0].replace("\n", " "), "cases": {}}
    for kind, n, precision in CASES:
        key = f"{kind}_{n}cam_{precision}"
        res["cases"][key] = case(kind, n, precision)
        r = res["cases"][key]
        print(f"{key:16s} off {r['off_ms']:.3f} ms  on {r['on_ms']:.3f} ms  gain {r['gain_ms']:.3f} ms  "
              f"identical {r['identical_actions']}", flush=True)
    print(save("l2_prefetch", res))


if __name__ == "__main__":
    main()
