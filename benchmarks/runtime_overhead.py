"""What the runtime adds over the model: loopback round trips of one observation (two 224x224x3 uint8
images and a state vector) against a model that returns at once, beside bare pyzmq servers that
receive the same bytes, all measured in one run.

    python3 benchmarks/runtime_overhead.py [-n 2000] [--passes 5] [--out benchmarks/results/runtime_overhead.json]

Servers run in their own processes (as in a deployment: the client does not share the server's GIL),
each a ROUTER on tcp://127.0.0.1, one client sending sequentially over a REQ socket:
  echo       bare pyzmq: sends every received frame back (the request's 300 KB return too)
  floor      bare pyzmq: receives the request, sends back the runtime's reply bytes (same sizes as
             the runtime's exchange: the transport's floor for it)
  runtime    flashrt's server with an instant model
each with the arrays inline in the msgpack body and with the images as extra frames that the server
reads in place (what runtime.client sends by default). Then `client`: the same through runtime.client.PolicyClient, so
the client's own encoding and decoding are in it too. The runtime's own share per request (decode,
validation, dispatch, encode) comes from the server's stats (total - infer, per request). Each
server's CPU time and minor page faults per request (from /proc) are noise-free where the round
trips are not: a server that keeps freed buffers around, say, shows up in its page faults.
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

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, minor page faults) of the process so far (Linux's /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])

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
    parser.add_argument("-n", type=int, default=2000, help="timed requests per case and pass")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--passes", type=int, default=5, help="complete passes; the summary is their median")
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
    passes = []
    for i in range(args.passes):
        passes.append(run_pass(layouts, obs, args))
        print(f"pass {i + 1}/{args.passes}: " + ", ".join(
            f"{name} p50 {p['p50']:.3f}" for name, p in passes[-1]["cases"].items() if name.startswith("runtime")))
    results = summarize(passes, layouts, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


def run_pass(layouts: dict, obs: dict, args) -> dict:
    """Every case of both layouts once, each layout against freshly started servers."""
    out: dict = {"cases": {}, "runtime_share_ms": {}, "load_average_at_start": os.getloadavg()}
    for layout, frames in layouts.items():
        runtime = Child("--role", "runtime", "-n", str(args.n))
        try:
            probe = zmq.Context.instance().socket(zmq.REQ)
            probe.connect(runtime.endpoint)
            probe.send_multipart(frames)
            reply = probe.recv()  # the floor server answers with exactly these bytes
            probe.close()
            bare = {mode: Child("--role", mode, stdin=b"%d\n" % len(reply) + reply) for mode in ("echo", "floor")}
            try:
                measure(out, layout, frames, obs, runtime, bare, args)
            finally:
                for child in bare.values():
                    child.close()
        finally:
            runtime.close()
    return out


def measure(out: dict, layout: str, frames: list, obs: dict, runtime: Child, bare: dict, args) -> None:
    # Interleave the cases in rounds so that machine noise hits them alike.
    samples: dict[str, list[float]] = {"echo": [], "floor": [], "runtime": []}
    servers = {"echo": bare["echo"], "floor": bare["floor"], "runtime": runtime}
    used = {name: [0.0, 0] for name in servers}  # the server's CPU seconds and minor page faults
    rounds = 5
    for _ in range(rounds):
        for name, server in servers.items():
            before = server.usage()
            samples[name] += time_raw(server.endpoint, frames, args.n // rounds, args.warmup // rounds)
            after = server.usage()
            used[name][0] += after[0] - before[0]
            used[name][1] += after[1] - before[1]
    sent = rounds * (args.n // rounds + args.warmup // rounds)
    out.setdefault("server_per_request", {}).update({
        f"{name}/{layout}": {"cpu_us": round(cpu / sent * 1e6, 1), "minor_faults": round(faults / sent, 2)}
        for name, (cpu, faults) in used.items()})
    with PolicyClient(runtime.endpoint) as c:  # the server's stats window holds exactly the timed requests
        stats = c.stats()["models"]["instant"]
    for name, ms in samples.items():
        out["cases"][f"{name}/{layout}"] = percentiles(ms)
    out["runtime_share_ms"][layout] = {m: stats[f"{m}_ms"] for m in ("overhead", "decode", "queue", "encode",
                                                                      "infer", "total")}
    if layout == "frames":  # the user's view: runtime.client encodes, sends, decodes
        out["cases"]["client/frames"] = percentiles(time_client(runtime.endpoint, obs, args.n, args.warmup))


def summarize(passes: list[dict], layouts: dict, args) -> dict:
    """Medians over the passes of each figure; every pass is kept too."""
    def median(get) -> float:
        return round(float(np.median([get(p) for p in passes])), 4)

    targets = {"round_trip_p50_ms": 0.5, "round_trip_p99_ms": 2.0, "runtime_share_p50_ms": 0.1}
    summary: dict = {"targets": targets, "statistic": f"median over {len(passes)} passes"}
    for layout, who in (("frames", "runtime.client (images as extra frames)"),
                        ("inline", "openpi / Isaac-GR00T / msgpack-numpy clients (arrays in the body)")):
        fig = {name: {q: median(lambda p, n=name, q=q: p["cases"][f"{n}/{layout}"][q]) for q in ("p50", "p99")}
               for name in ("runtime", "floor", "echo")}
        share = median(lambda p: p["runtime_share_ms"][layout]["overhead"]["p50"])
        summary[layout] = {
            "sent_by": who,
            "runtime_round_trip_ms": fig["runtime"],
            "bare_floor_round_trip_ms": fig["floor"],
            "bare_echo_round_trip_ms": fig["echo"],
            "added_over_floor_p50_ms": round(fig["runtime"]["p50"] - fig["floor"]["p50"], 4),
            "runtime_share_p50_ms": share,
            "runtime_share_breakdown_p50_ms": {m: median(lambda p, m=m: p["runtime_share_ms"][layout][m]["p50"])
                                               for m in ("decode", "queue", "encode", "infer")},
            "server_per_request": {
                name: {m: median(lambda p, n=name, m=m: p["server_per_request"][f"{n}/{layout}"][m])
                       for m in ("cpu_us", "minor_faults")} for name in ("runtime", "floor")},
            "per_pass": {"runtime_round_trip_p50_ms": [p["cases"][f"runtime/{layout}"]["p50"] for p in passes],
                         "runtime_share_p50_ms": [p["runtime_share_ms"][layout]["overhead"]["p50"] for p in passes]},
            "meets_targets": fig["runtime"]["p50"] <= targets["round_trip_p50_ms"]
                             and fig["runtime"]["p99"] <= targets["round_trip_p99_ms"]
                             and share <= targets["runtime_share_p50_ms"],
        }
    summary["client_frames_round_trip_ms"] = {q: median(lambda p, q=q: p["cases"]["client/frames"][q])
                                              for q in ("p50", "p99")}
    return {
        "summary": summary,
        "request_bytes": {layout: sum(len(f) for f in frames) for layout, frames in layouts.items()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
                    "numpy": np.__version__, "transport": "tcp://127.0.0.1 loopback, REQ -> ROUTER"},
        "method": (f"{len(passes)} passes; in each, per layout, fresh server processes and {args.n} timed requests "
                   f"per case after {args.warmup} warm-up, sequential, one client, the cases interleaved in 5 "
                   "rounds; runtime share from the server's own per-request stats (total - infer: receive to "
                   "reply encoded, including the hand-overs to the scheduler thread and back)"),
        "passes": passes,
    }


if __name__ == "__main__":
    main()
