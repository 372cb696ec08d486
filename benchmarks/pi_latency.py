"""Latency of Pi0.5 / Pi0 at full size on one GPU, beside LeRobot in the same run.

Cases (10 flow steps, chunk 50, bf16, random weights at full size): Pi0.5 with 2 and 3 cameras, Pi0
with 3 cameras. For flashrt: first call (load + capture + first inference), graph replay p50/p95
(CUDA events), the whole `infer()` call p50/p95 (host clock: H2D copies, image preprocessing,
replay, D2H), kernels launched per inference, per-segment times; with `--kernels` the torch-ops path
and the native-kernel path side by side. For LeRobot: eager `sample_actions` (and torch.compile with
`--compile`, which takes minutes). Prompt: 48 valid tokens (LeRobot pads to 200 / 48; flashrt pads to
its next bucket), plus flashrt at the full 200-token bucket for Pi0.5.

    PYTHONPATH=peer_site python benchmarks/pi_latency.py [--kernels] [--compile] [--no-lerobot]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (ceilings, count_kernels, cuda_timed, lerobot_inputs, lerobot_model,  # noqa: E402
                               machine, save, wall_timed)

import flashrt  # noqa: E402

CAMS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
CASES = [("pi05", 2), ("pi05", 3), ("pi0", 3)]
# BF16 floors from reference/performance.md §3 (H100, measured ceilings): Pi0.5 2 views ~5.7 ms,
# 3 views ~7.6 ms (unpadded prompts).
FLOORS_MS = {("pi05", 2): 5.7, ("pi05", 3): 7.6}


def observation(n_cams: int, n_tokens: int, rng) -> dict:
    return {"images": {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in CAMS[:n_cams]},
            "state": rng.normal(size=8).astype(np.float32),
            "prompt_tokens": np.concatenate([[2], rng.integers(3, 257000, n_tokens - 1)]).astype(np.int64)}


def flashrt_case(kind: str, n_cams: int, kernels: str) -> dict:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    policy = flashrt.load(dict(name=f"{kind}_{n_cams}", kind=kind, checkpoint="random",
                               random={"seed": 0, "size": "full"}, cameras=CAMS[:n_cams], state_dim=8,
                               action_dim=7, precision="bf16", kernels=kernels))
    obs = observation(n_cams, 48, rng)
    policy.infer(obs)
    out = {"first_call_s": time.perf_counter() - t0, "load_s": policy.load_s,
           "capture_s": policy.engine.capture_s, "native_kernels": policy.model.ops.native,
           "attention": policy.platform.attention_for(policy.spec.precision)}
    for n_tok in ([48, 200] if kind == "pi05" else [48]):
        obs = observation(n_cams, n_tok, rng)
        policy.infer(obs)  # stage this prompt's inputs in the static buffers
        bucket = next(b for b in policy.buckets if b >= n_tok)
        r = {"bucket": bucket,
             "replay_ms": cuda_timed(lambda: policy.engine.run(bucket), 10, 100),
             "infer_ms": wall_timed(lambda: policy.infer(obs), 10, 100),
             "kernels_per_inference": count_kernels(lambda: policy.engine.run_eager(bucket)),
             "segments_ms": policy.engine.time_segments(bucket)}
        out[f"tokens_{n_tok}"] = r
    del policy
    gc.collect()
    torch.cuda.empty_cache()
    return out


def lerobot_case(kind: str, n_cams: int, compile_mode: str | None) -> dict:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model, cfg = lerobot_model(kind, "bfloat16", compile_mode)
    obs = observation(n_cams, 48, rng)
    args = lerobot_inputs(kind, list(obs["images"].values()), obs["prompt_tokens"], cfg.tokenizer_max_length)
    with torch.inference_mode():
        model.sample_actions(**args)
        first = time.perf_counter() - t0
        r = cuda_timed(lambda: model.sample_actions(**args), 3, 20)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"first_call_s": first, "sample_actions_ms": r, "padded_tokens": cfg.tokenizer_max_length}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", action="store_true", help="also run with kernels: torch (A/B)")
    ap.add_argument("--compile", action="store_true", help="also LeRobot torch.compile (minutes)")
    ap.add_argument("--no-lerobot", action="store_true")
    ap.add_argument("--cases", default=",".join(f"{k}:{c}" for k, c in CASES))
    ap.add_argument("--name", default="pi_latency", help="results file name (results/<name>_<gpu>.json)")
    args = ap.parse_args()
    res = {"machine": machine(), "ceilings": ceilings(), "settings": {"steps": 10, "chunk": 50, "dtype": "bf16"},
           "cases": {}}
    for spec in args.cases.split(","):
        kind, n = spec.split(":")
        n = int(n)
        key = f"{kind}_{n}cam"
        entry = res["cases"].setdefault(key, {"floor_bf16_ms": FLOORS_MS.get((kind, n))})
        for label, fn in ([("flashrt", lambda: flashrt_case(kind, n, "auto"))]
                          + ([("flashrt_torch_ops", lambda: flashrt_case(kind, n, "torch"))] if args.kernels else [])
                          + ([] if args.no_lerobot else [("lerobot_eager", lambda: lerobot_case(kind, n, None))])
                          + ([("lerobot_compile", lambda: lerobot_case(kind, n, "reduce-overhead"))] if args.compile else [])):
            try:
                entry[label] = fn()
            except Exception:
                import traceback
                entry[label] = {"error": traceback.format_exc()[-3000:]}
            print(key, label, json.dumps(entry[label])[:600], flush=True)
            save(args.name, res)
    # A short table last.
    for key, e in res["cases"].items():
        f = e.get("flashrt", {}).get("tokens_48", {})
        le = e.get("lerobot_eager", {}).get("sample_actions_ms", {})
        print(f"{key:12s} flashrt replay p50 {f.get('replay_ms', {}).get('p50', float('nan')):7.2f} ms  "
              f"infer p50 {f.get('infer_ms', {}).get('p50', float('nan')):7.2f} ms  "
              f"kernels {f.get('kernels_per_inference')}  first {e.get('flashrt', {}).get('first_call_s', float('nan')):.1f} s  "
              f"| lerobot eager p50 {le.get('p50', float('nan')):7.2f} ms")


if __name__ == "__main__":
    main()
