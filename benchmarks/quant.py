"""FP8 and INT8 against bf16 at full size: accuracy over 20 observations and latency, with LeRobot.

For Pi0.5 (2 cameras) and Pi0 (3 cameras), random weights at full size: one bf16 policy, one FP8 and
one INT8 (each calibrated and guarded at load, see flashrt/calibrate.py), and three FP8 variants:
every projection in FP8 (`calibration.keep_bf16: []`; the default keeps SigLIP's attention
projections in bf16, quant.KEEP_BF16), one weight scale per output channel
(`calibration.fp8_weight_scales: channel`) and all of SigLIP in bf16
(`calibration.keep_bf16: ["vision.*"]`). Accuracy: 20 random
observations, the same noise for every precision: mean and worst cosine of the action chunk to bf16
and the max relative error. Latency: graph replay and `infer()` p50/p95 for each precision, and
LeRobot eager (bf16) in the same run. Targets: worst cosine >= 0.995 (FP8), >= 0.99 (INT8).

    PYTHONPATH=peer_site python benchmarks/quant.py [--no-lerobot]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import cuda_timed, machine, save, wall_timed  # noqa: E402
from benchmarks.pi_latency import CAMS, lerobot_case, observation  # noqa: E402

import flashrt  # noqa: E402
from flashrt.calibrate import cosine  # noqa: E402


# (label, precision, calibration settings): FP8 as configured by default, with every projection
# quantized, with one weight scale per output channel, and with all of SigLIP kept in bf16
VARIANTS = [("bf16", "bf16", {}), ("fp8", "fp8", {}), ("fp8_all", "fp8", {"keep_bf16": []}),
            ("fp8_channel_scales", "fp8", {"fp8_weight_scales": "channel"}),
            ("fp8_vision_bf16", "fp8", {"keep_bf16": ["vision.*"]}), ("int8", "int8", {})]


def case(kind: str, n_cams: int, lerobot: bool) -> dict:
    rng = np.random.default_rng(7)
    observations = [observation(n_cams, 48, rng) for _ in range(20)]
    noises = [rng.normal(size=(50, 32)).astype(np.float32) for _ in observations]
    base = dict(name=kind, kind=kind, checkpoint="random", random={"seed": 0, "size": "full"},
                cameras=CAMS[:n_cams], state_dim=8, action_dim=7)
    out, chunks = {}, {}
    for label, precision, settings in VARIANTS:
        try:
            p = flashrt.load({**base, "precision": precision, "calibration": {"refresh": True, **settings}})
        except Exception as e:
            out[label] = {"error": repr(e)[-2000:]}
            continue
        chunks[label] = [p.infer(o, noise=n)["actions"] for o, n in zip(observations, noises)]
        bucket = next(b for b in p.buckets if b >= 48)
        p.infer(observations[0])
        out[label] = {"precision": precision, "calibration_settings": settings, "first_call_s": p.first_call_s,
                      "calibration": p.spec.calibration,
                      "replay_ms": cuda_timed(lambda p=p: p.engine.run(bucket), 10, 100),
                      "infer_ms": wall_timed(lambda p=p: p.infer(observations[0]), 10, 100)}
        if precision != "bf16" and "bf16" in chunks:
            cos = [cosine(a, b) for a, b in zip(chunks[label], chunks["bf16"])]
            rel = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(chunks[label], chunks["bf16"])]
            out[label].update(cosine_mean=float(np.mean(cos)), cosine_worst=float(np.min(cos)),
                              max_rel_err=float(np.max(rel)))
        del p
        gc.collect()
        torch.cuda.empty_cache()
        print(kind, label, json.dumps({k: v for k, v in out[label].items() if k != "calibration"})[:500], flush=True)
    if lerobot:
        out["lerobot_eager"] = lerobot_case(kind, n_cams, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-lerobot", action="store_true")
    args = ap.parse_args()
    res = {"machine": machine(), "settings": {"steps": 10, "chunk": 50, "prompt_tokens": 48, "observations": 20},
           "cases": {}}
    for kind, n in (("pi05", 2), ("pi0", 3)):
        res["cases"][f"{kind}_{n}cam"] = case(kind, n, not args.no_lerobot)
        save("quant", res)
    for key, c in res["cases"].items():
        for prec, *_ in VARIANTS:
            r = c.get(prec, {})
            print(f"{key:10s} {prec:15s} replay p50 {r.get('replay_ms', {}).get('p50', float('nan')):7.2f} ms  "
                  f"cos mean {r.get('cosine_mean', float('nan')):.5f} worst {r.get('cosine_worst', float('nan')):.5f}  "
                  f"{r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
