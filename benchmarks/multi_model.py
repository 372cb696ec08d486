"""Several models on one GPU: a real-time policy, a slower model and a best-effort loop, for a minute.

Scenario (issue 7): Pi0.5 with 2 cameras at 20 Hz with a 30 ms deadline (real time, high-priority
stream), Pi0 with 3 cameras at 10 Hz (deadline: its period), and a full-size Pi0.5 kept busy at
batch 1 (best effort). Both runs use runtime.scheduler with the CUDA device and the same releases:
(a) `fifo`: whole inferences in arrival order; (b) `edf`: the scheduler (segment interleaving,
priorities, admission control). Reported per model: completions, deadline misses, latency p50/p99
(release to result); the best-effort throughput; the real-time model's solo latency; a timeline.

    python benchmarks/multi_model.py [--seconds 60] [--kernels torch]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, save, wall_timed  # noqa: E402
from runtime.scheduler import INF, CudaDevice, Scheduler, SyncDevice, Task  # noqa: E402

import flashrt  # noqa: E402

CAMS = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
MODELS = {  # name: (kind, cameras, seed, period s, deadline s, priority, real time)
    "rt_pi05": ("pi05", 2, 0, 0.050, 0.030, 1, True),
    "pi0_10hz": ("pi0", 3, 1, 0.100, 0.100, 0, False),
    "best_effort_pi05": ("pi05", 2, 2, None, None, 0, False),
}


def observation(n_cams: int, rng) -> dict:
    return {"images": {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in CAMS[:n_cams]},
            "state": rng.normal(size=8).astype(np.float32),
            "prompt_tokens": np.concatenate([[2], rng.integers(3, 500, 47)]).astype(np.int64)}


def run(mode: str, policies: dict, obs: dict, seconds: float) -> dict:
    dev = CudaDevice() if torch.cuda.is_available() else SyncDevice()
    s = Scheduler(dev, depth=2, mode=mode)
    s.trace = []
    be_done: list[float] = []

    def done(task, err):
        if err is None:
            task.payload.result()
        else:
            task.payload.cancel()

    for name, (kind, cams, seed, period, deadline, prio, rt) in MODELS.items():
        policy = policies[name]
        if period is None:
            continue

        def make(o, release, policy=policy, name=name, deadline=deadline, prio=prio, rt=rt):
            job = policy.prepare(o)
            return Task(name, job.segments, deadline=release + deadline, priority=prio, realtime=rt,
                        payload=job, on_done=done)

        s.add_periodic(name, period, make)
        s.publish(name, obs[name])

    def best_effort(task=None, err=None):
        if err is not None:
            task.payload.cancel()
            return
        if task is not None:
            task.payload.result()
            be_done.append(task.finished)
        job = policies["best_effort_pi05"].prepare(obs["best_effort_pi05"])
        s.submit(Task("best_effort_pi05", job.segments, deadline=INF, payload=job, on_done=best_effort,
                      release=dev.now()))

    best_effort()
    stop = threading.Event()
    t0 = time.perf_counter()
    th = threading.Thread(target=s.run, args=(stop,), daemon=True)
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join()
    s.cancel_pending()  # jobs staged but not launched must not leak into the next run
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out = {name: t.as_dict() for name, t in s.tally.items()}
    out["best_effort_pi05"]["throughput_hz"] = len(be_done) / elapsed
    # A timeline window: one second from the middle of the run, times relative to its start.
    mid = t0 + elapsed / 2
    out["timeline"] = [[m, n, a - mid, (b or a) - mid] for m, n, a, b in s.trace if mid <= a <= mid + 1.0]
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("fifo", "edf") if m in res["runs"]]
    fig, axes = plt.subplots(len(modes), 1, figsize=(14, 2.2 * len(modes) + 0.6), sharex=True, squeeze=False)
    colors = {"rt_pi05": "tab:red", "pi0_10hz": "tab:blue", "best_effort_pi05": "tab:gray"}
    for ax, mode in zip(axes[:, 0], modes):
        for m, _, a, b in res["runs"][mode]["timeline"]:
            row = list(MODELS).index(m)
            ax.broken_barh([(a * 1e3, max((b - a) * 1e3, 0.05))], (row - 0.4, 0.8), color=colors[m])
        ax.set_yticks(range(len(MODELS)), list(MODELS))
        rt = res["runs"][mode]["rt_pi05"]
        ax.set_title(f"{mode}: rt_pi05 misses {rt['misses']}, p99 {rt['latency_ms']['p99']:.1f} ms; "
                     f"best effort {res['runs'][mode]['best_effort_pi05']['throughput_hz']:.1f} Hz", fontsize=9)
    axes[-1, 0].set_xlabel("ms (segment launch to observed completion; 1 s window)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--modes", default="fifo,edf")
    ap.add_argument("--size", default="full", help="tiny: a CPU smoke run of the whole benchmark")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    policies, obs = {}, {}
    res = {"machine": machine(), "seconds": args.seconds, "models": {k: list(v) for k, v in MODELS.items()},
           "solo": {}, "runs": {}}
    for name, (kind, cams, seed, *_rest) in MODELS.items():
        policies[name] = flashrt.load(dict(name=name, kind=kind, checkpoint="random", random={"seed": seed, "size": args.size},
                                           cameras=CAMS[:cams], state_dim=8, action_dim=7,
                                           precision="bf16" if torch.cuda.is_available() else "fp32",
                                           kernels=args.kernels))
        obs[name] = observation(cams, rng)
        res["solo"][name] = wall_timed(lambda: policies[name].infer(obs[name]), 5, 40)
        print(name, "solo", json.dumps(res["solo"][name]), flush=True)
    for mode in args.modes.split(","):
        gc.collect()
        res["runs"][mode] = run(mode, policies, obs, args.seconds)
        print(mode, json.dumps({k: v for k, v in res["runs"][mode].items() if k != "timeline"}), flush=True)
    solo_rt = res["solo"]["rt_pi05"]["p50"]
    edf, fifo = res["runs"].get("edf"), res["runs"].get("fifo")
    if edf and fifo:
        res["targets"] = {
            "rt_zero_misses": edf["rt_pi05"]["misses"] == 0,
            "rt_p99_over_solo": edf["rt_pi05"]["latency_ms"]["p99"] / solo_rt,
            "best_effort_ratio": edf["best_effort_pi05"]["throughput_hz"] / max(fifo["best_effort_pi05"]["throughput_hz"], 1e-9)}
    path = save("multi_model", res)
    try:
        plot(res, path.with_suffix(".png"))
        import os
        if os.environ.get("OUT"):
            plot(res, Path(os.environ["OUT"]) / path.with_suffix(".png").name)
    except Exception as e:  # the figures matter more than the picture
        print("plot failed:", e)
    print(json.dumps(res.get("targets"), indent=1))


if __name__ == "__main__":
    main()
