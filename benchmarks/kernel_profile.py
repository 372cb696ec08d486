"""Where the GPU time of one inference goes, kernel by kernel: CUDA-graph replays of the whole model
under torch.profiler (CUPTI), summed per kernel name.

    python benchmarks/kernel_profile.py [--kind pi05] [--cameras 2] [--precision bf16]
    # writes benchmarks/results/kernel_profile_<kind>_<precision>_<gpu>.json

Random full-size weights, a 48-token prompt, as benchmarks/pi_latency.py. A kernel launched with
programmatic dependent launch (all of flashrt's own on sm_90+) starts while the kernel before it
drains and waits for it, so its duration here includes that wait: the sum over kernels exceeds the
replay time, and the overlap is what PDL gains.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flashrt  # noqa: E402
from benchmarks.common import cuda_timed, machine, save  # noqa: E402
from benchmarks.pi_latency import CAMS, observation  # noqa: E402

REPLAYS = 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="pi05", choices=["pi0", "pi05"])
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    policy = flashrt.load(dict(name=args.kind, kind=args.kind, checkpoint="random", random={"seed": 0, "size": "full"},
                               cameras=CAMS[:args.cameras], state_dim=8, action_dim=7, precision=args.precision))
    policy.infer(observation(args.cameras, 48, np.random.default_rng(0)))
    bucket = next(b for b in policy.buckets if b >= 48)
    replay = cuda_timed(lambda: policy.engine.run(bucket), 5, 50)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            policy.engine.run(bucket)
        torch.cuda.synchronize()
    per_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.device_time_total
    rows = sorted(({"kernel": name, "calls": n // REPLAYS, "ms": round(us / REPLAYS / 1e3, 4),
                    "us_per_call": round(us / max(n, 1), 2)} for name, (n, us) in per_name.items()),
                  key=lambda r: -r["ms"])
    res = {"machine": machine(), "case": vars(args), "replay_ms": replay,
           "kernel_ms_sum": round(sum(r["ms"] for r in rows), 3), "kernels": sum(r["calls"] for r in rows),
           "by_kernel": rows}
    print(f"replay p50 {replay['p50']:.2f} ms; kernel time summed {res['kernel_ms_sum']:.2f} ms over {res['kernels']} kernels")
    for r in rows[:25]:
        print(f"{r['ms']:7.3f} ms {r['calls']:5d} x {r['us_per_call']:7.2f} us  {r['kernel'][:100]}")
    print(save(f"kernel_profile_{args.kind}_{args.precision}", res))


if __name__ == "__main__":
    main()
