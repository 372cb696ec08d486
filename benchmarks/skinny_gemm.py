"""What the expert's o and down through csrc/skinny_gemm.cu gain: the same bf16 models with the platform's
`skinny_gemm` off (cuBLAS) and on, loaded side by side (same random weights) and timed in interleaved rounds.

    python benchmarks/skinny_gemm.py   # writes benchmarks/results/skinny_gemm_<gpu>.json

Cases: Pi0.5 2 cameras and Pi0 3 cameras in bf16 (10 steps, chunk 50, 48-token prompt). Per case: graph
replay p50 in 4 rounds each, and the cosine between the two action chunks for the same observation and
noise (the split-K sum rounds differently from cuBLAS: close, not bit-identical).
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
from flashrt.quant import SkinnyWeight  # noqa: E402

CASES = [("pi05", 2), ("pi0", 3)]
ROUNDS = 4


def load(kind: str, n_cams: int, skinny: bool):
    """A bf16 policy on this GPU with the skinny GEMM forced on or off (the platform table's entry)."""
    with platform_entry(hardware._SKINNY_GEMM, skinny):
        policy = flashrt.load(dict(name=kind, kind=kind, checkpoint="random",
                                   random={"seed": 0, "size": "full"}, cameras=CAMS[:n_cams], state_dim=8,
                                   action_dim=7, precision="bf16"))
    assert isinstance(policy.model.expert[0].down, SkinnyWeight) == skinny
    return policy


def case(kind: str, n_cams: int) -> dict:
    rng = np.random.default_rng(1)
    obs = observation(n_cams, 48, rng)
    noise = rng.normal(size=(50, 32)).astype(np.float32)
    policies = {"off": load(kind, n_cams, False), "on": load(kind, n_cams, True)}
    a, b = (p.infer(obs, noise=noise)["actions"].ravel().astype(np.float64) for p in policies.values())
    out = {**replay_ab(policies, obs, ROUNDS),
           "action_cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))}
    del policies
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    res = {"machine": machine(), "method": __doc__.split("\n\n")[0].replace("\n", " "), "cases": {}}
    for kind, n in CASES:
        key = f"{kind}_{n}cam_bf16"
        res["cases"][key] = r = case(kind, n)
        print(f"{key:16s} off {r['off_ms']:.3f} ms  on {r['on_ms']:.3f} ms  gain {r['gain_ms']:.3f} ms  "
              f"action cosine {r['action_cosine']:.6f}", flush=True)
    print(save("skinny_gemm", res))


if __name__ == "__main__":
    main()
