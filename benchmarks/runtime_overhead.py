"""What the runtime adds over the model: loopback round trips of one observation (two 224x224x3 uint8
images and a state vector) against a model that returns at once, beside bare pyzmq servers that
receive the same bytes, all measured in one run.

    python3 benchmarks/runtime_overhead.py [-n 3000] [--out benchmarks/results/runtime_overhead.json]

Servers run in their own processes (as in a deployment: the client does not share the server's GIL),
each a ROUTER on tcp://127.0.0.1, one client sending sequentially over a REQ socket:
  echo       bare pyzmq: sends every received frame back (the request's 300 KB return too)
  floor      bare pyzmq: receives the request, sends back the runtime's reply bytes (same sizes as
             the runtime's exchange: the transport's floor for it)
  runtime    flashrt's server with an instant model
each with the arrays inline in the msgpack body and with the images as extra frames that the server
reads in place (what runtime.client sends by default). Then `client`: the same through runtime.client.PolicyClient, so
the client's own encoding and decoding are in it too. The runtime's own share per request (decode,
validation, dispatch, encode) comes from the server's stats (total - infer, per request).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.client import PolicyClient  # noqa: E402
from runtime.protocol import encode  # noqa: E402

MODEL = {"name": "instant", "kind": "pi05", "checkpoint": "random", "device": "cpu",
         "cameras": ["base_0_rgb", "left_wrist_0_rgb"], "state_dim": 8, "action_dim": 7, "action_horizon": 10}


# ---------------------------------------------------------------------------------------------
# Server processes


class InstantPolicy:
    """The engine's interface, answering at once with a fixed chunk."""

    class Spec:
        def to_dict(self) -> dict:
            return {"name": "instant", "kind": "pi05", "cameras": MODEL["cameras"], "optional_cameras": [],
                    "image_size": [224, 224], "state_dim": 8, "action_horizon": 10, "action_dim": 7}

    spec = Spec()
    actions = np.linspace(-1, 1, 70, dtype=np.float32).reshape(10, 7)

    def infer(self, obs: dict) -> dict:
        return {"actions": self.actions}

    def reset(self) -> None:
        pass


def serve_runtime(window: int) -> None:
    from runtime.config import parse_deployment
    from runtime.server import Server

    config = parse_deployment({"server": {"bind": "tcp://127.0.0.1:*", "stats_window": window},
                               "models": [MODEL]}, "benchmark")
    server = Server(config, loader=lambda cfg: InstantPolicy()).start()
    print(server.bound[0], flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


def serve_bare(mode: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    reply = sys.stdin.buffer.read(int(sys.stdin.buffer.readline()))  # the runtime's reply bytes
    while True:
        frames = sock.recv_multipart(copy=False)
        sock.send_multipart(frames if mode == "echo" else frames[:2] + [reply], copy=False)


class Child:
    """A server process of this script; it prints its endpoint, then reads its stdin until closed."""

    def __init__(self, *args: str, stdin: bytes = b""):
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.endpoint = self.proc.stdout.readline().decode().strip()
        self.proc.stdin.write(stdin)
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.stdin.close()  # the runtime stops cleanly; the bare servers are simply killed
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Measurement


def percentiles(ms: list[float]) -> dict:
    p = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p[0]), 4), "p90": round(float(p[1]), 4), "p99": round(float(p[2]), 4),
            "max": round(float(max(ms)), 4), "n": len(ms)}


def time_raw(endpoint: str, frames: list, n: int, warmup: int) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.connect(endpoint)
    out = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        sock.send_multipart(frames)  # as runtime.client sends (a zero-copy send costs more at this size)
        sock.recv_multipart()
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    sock.close()
    return out


def time_client(endpoint: str, obs: dict, n: int, warmup: int) -> list[float]:
    out = []
    with PolicyClient(endpoint) as c:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            c.infer(obs)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
    return out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="timed requests per case")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/runtime_overhead.json")
    parser.add_argument("--role", choices=["runtime", "echo", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "runtime":
        return serve_runtime(args.n)
    if args.role:
        return serve_bare(args.role)

    rng = np.random.default_rng(0)
    obs = {"images": {cam: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for cam in MODEL["cameras"]},
           "state": rng.standard_normal(8).astype(np.float32)}
    request = {"endpoint": "infer", "id": 1, "data": obs}
    images: list = []
    layouts = {"inline": [encode(request)],  # arrays inside the msgpack body
               "frames": [encode(request, frames=images), *images]}  # images as extra frames

    results: dict = {"cases": {}, "runtime_share_ms": {}, "load_average_at_start": os.getloadavg()}
    for layout, frames in layouts.items():
        runtime = Child("--role", "runtime", "-n", str(args.n))
        reply = zmq.Context.instance().socket(zmq.REQ)
        reply.connect(runtime.endpoint)
        reply.send_multipart(frames)
        reply_bytes = reply.recv()
        reply.close()
        bare = {mode: Child("--role", mode, stdin=b"%d\n" % len(reply_bytes) + reply_bytes)
                for mode in ("echo", "floor")}
        try:
            measure(results, layout, frames, obs, runtime, bare, args)
        finally:
            for child in (runtime, *bare.values()):
                child.close()
        results["request_bytes"] = results.get("request_bytes", {}) | {layout: sum(len(f) for f in frames)}
        results["reply_bytes"] = len(reply_bytes)

    summarize(results, args)


def measure(results: dict, layout: str, frames: list, obs: dict, runtime: Child, bare: dict, args) -> None:
    # Interleave the cases in rounds so that machine noise hits them alike.
    samples: dict[str, list[float]] = {"echo": [], "floor": [], "runtime": []}
    rounds = 5
    for _ in range(rounds):
        for name, endpoint in (("echo", bare["echo"].endpoint), ("floor", bare["floor"].endpoint),
                               ("runtime", runtime.endpoint)):
            samples[name] += time_raw(endpoint, frames, args.n // rounds, args.warmup // rounds)
    with PolicyClient(runtime.endpoint) as c:  # the server's stats window holds exactly the timed requests
        stats = c.stats()["models"]["instant"]
    for name, ms in samples.items():
        results["cases"][f"{name}/{layout}"] = percentiles(ms)
    results["runtime_share_ms"][layout] = {m: stats[f"{m}_ms"] for m in ("overhead", "decode", "queue", "encode",
                                                                          "infer", "total")}
    if layout == "frames":  # the user's view: runtime.client encodes, sends, decodes
        results["cases"]["client/frames"] = percentiles(time_client(runtime.endpoint, obs, args.n, args.warmup))


def summarize(results: dict, args) -> None:
    cases = results["cases"]
    targets = {"round_trip_p50_ms": 0.5, "round_trip_p99_ms": 2.0, "runtime_share_p50_ms": 0.1}
    results["summary"] = {"targets": targets}
    for layout, who in (("frames", "runtime.client (images as extra frames)"),
                        ("inline", "openpi / Isaac-GR00T / msgpack-numpy clients (arrays in the body)")):
        rt, floor, echo = cases[f"runtime/{layout}"], cases[f"floor/{layout}"], cases[f"echo/{layout}"]
        share = results["runtime_share_ms"][layout]["overhead"]["p50"]
        results["summary"][layout] = {
            "sent_by": who,
            "runtime_round_trip_ms": {"p50": rt["p50"], "p99": rt["p99"]},
            "bare_echo_round_trip_ms": {"p50": echo["p50"], "p99": echo["p99"]},
            "bare_floor_round_trip_ms": {"p50": floor["p50"], "p99": floor["p99"]},
            "added_over_floor_p50_ms": round(rt["p50"] - floor["p50"], 4),
            "runtime_share_p50_ms": share,
            "meets_targets": rt["p50"] <= targets["round_trip_p50_ms"] and rt["p99"] <= targets["round_trip_p99_ms"]
                             and share <= targets["runtime_share_p50_ms"],
        }
    results["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                          "numpy": np.__version__, "transport": "tcp://127.0.0.1 loopback, REQ -> ROUTER",
                          "load_average_at_end": os.getloadavg()}
    results["method"] = (f"{args.n} timed requests per case after {args.warmup} warm-up, sequential, one client; "
                         "cases interleaved in 5 rounds; servers in separate processes; runtime share from the "
                         "server's own per-request stats (total - infer, receive to reply encoded)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, p in cases.items():
        print(f"{name:16s} p50 {p['p50']:.3f} ms  p99 {p['p99']:.3f} ms")
    for layout, share in results["runtime_share_ms"].items():
        print(f"runtime share ({layout}): " + ", ".join(f"{m} p50 {v['p50']:.4f}" for m, v in share.items()))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
