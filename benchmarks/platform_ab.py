"""What one of the platform table's kernel flags gains: the same models with the flag off and on, loaded
side by side (same random weights) and timed in interleaved rounds.

    python benchmarks/platform_ab.py FLAG   # writes benchmarks/results/FLAG_<gpu>.json

FLAG is one of FLAGS below: l2_prefetch (the expert's weights prefetched into L2) or skinny_gemm
(the expert's o and down through csrc/skinny_gemm.cu, bf16). Per case (10 steps, chunk 50, 48-token
prompt): graph replay p50 in interleaved rounds, and how the two action chunks for the same
observation and noise compare: bit-identical where the flag changes no arithmetic (the prefetch),
else by their cosine (a different summation order). An FP8 policy with the flag on reuses the
calibration the first one made, so both run the same scales.
"""

from __future__ import annotations

import argparse
import gc
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import cuda_timed, machine, save  # noqa: E402
from benchmarks.pi_latency import CAMS, observation  # noqa: E402

import flashrt  # noqa: E402
from flashrt import hardware  # noqa: E402

# flag -> (the hardware table that turns it on per platform, cases (kind, cameras, precision))
FLAGS = {
    "l2_prefetch": (hardware._L2_PREFETCH, [("pi05", 2, "bf16"), ("pi05", 2, "fp8"), ("pi0", 3, "bf16")]),
    "skinny_gemm": (hardware._SKINNY_GEMM, [("pi05", 2, "bf16"), ("pi0", 3, "bf16")]),
}
ROUNDS = 4


@contextmanager
def platform_entry(table: set, on: bool):
    """Policies loaded inside see this GPU in one of flashrt.hardware's per-platform tables (e.g.
    hardware._L2_PREFETCH) or not, whatever the table says; it is restored after."""
    saved = set(table)
    table.clear()
    if on:
        table.add(hardware.detect().name)
    hardware.detect.cache_clear()
    try:
        yield
    finally:
        table.clear()
        table.update(saved)
        hardware.detect.cache_clear()


def replay_ab(policies: dict, obs: dict, rounds: int, prompt_tokens: int = 48) -> dict:
    """Graph replay p50 of {"off": policy, "on": policy} in interleaved rounds, so drift hits both."""
    bucket = next(b for b in policies["off"].buckets if b >= prompt_tokens)
    times: dict = {k: [] for k in policies}
    for _ in range(rounds):
        for k, p in policies.items():
            p.infer(obs)
            times[k].append(cuda_timed(lambda p=p: p.engine.run(bucket), 10, 100)["p50"])
    off, on = float(np.median(times["off"])), float(np.median(times["on"]))
    return {"replay_p50_ms_rounds": times, "off_ms": off, "on_ms": on, "gain_ms": off - on}


def load(flag: str, kind: str, n_cams: int, precision: str, on: bool):
    """A policy on this GPU with `flag` forced on or off (the platform table's entry)."""
    cfg = dict(name=kind, kind=kind, checkpoint="random", random={"seed": 0, "size": "full"},
               cameras=CAMS[:n_cams], state_dim=8, action_dim=7, precision=precision)
    if precision != "bf16" and not on:
        cfg["calibration"] = {"refresh": True}
    with platform_entry(FLAGS[flag][0], on):
        policy = flashrt.load(cfg)
    assert getattr(policy.platform, flag) == on
    return policy


def case(flag: str, kind: str, n_cams: int, precision: str) -> dict:
    rng = np.random.default_rng(1)
    obs = observation(n_cams, 48, rng)
    noise = rng.normal(size=(50, 32)).astype(np.float32)
    policies = {k: load(flag, kind, n_cams, precision, k == "on") for k in ("off", "on")}
    a, b = (p.infer(obs, noise=noise)["actions"] for p in policies.values())
    a64, b64 = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    out = {**replay_ab(policies, obs, ROUNDS), "identical_actions": bool(np.array_equal(a, b)),
           "action_cosine": float(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64))}
    del policies
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("flag", choices=sorted(FLAGS))
    flag = ap.parse_args().flag
    method = __doc__.split("\n\n")[0].replace("\n", " ")
    res = {"machine": machine(), "flag": flag, "method": method, "cases": {}}
    for kind, n, precision in FLAGS[flag][1]:
        key = f"{kind}_{n}cam_{precision}"
        res["cases"][key] = r = case(flag, kind, n, precision)
        print(f"{key:16s} off {r['off_ms']:.3f} ms  on {r['on_ms']:.3f} ms  gain {r['gain_ms']:.3f} ms  "
              f"identical {r['identical_actions']}  cosine {r['action_cosine']:.6f}", flush=True)
    print(save(flag, res))


if __name__ == "__main__":
    main()
