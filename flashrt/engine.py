"""Execution of a model's segments over static buffers: eager on the CPU, CUDA graphs on a GPU.

An inference is a list of `Segment`s (vision, prefix, step 0..n-1) for the prompt-length bucket of
the call. On a GPU every segment of every bucket is captured once at start, into one memory pool
(the segments run one after another and talk only through the static buffers, so they may share
it); serving replays them, so nothing is allocated or recaptured while serving. Each segment can be
launched on any stream and records how long it took the last time it was timed, which is what a
scheduler interleaving several models needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Segment:
    name: str
    fn: Callable[[], None]
    graph: torch.cuda.CUDAGraph | None = None
    duration_ms: float | None = field(default=None)  # measured by Engine.time_segments

    def launch(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue the segment's work on `stream` (default: the current stream)."""
        if stream is not None:
            with torch.cuda.stream(stream):
                self.launch()
        elif self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():  # the static buffers are inference tensors
                self.fn()


class Engine:
    def __init__(self, model, buf, buckets: list[int], device: torch.device, cuda_graphs: bool,
                 prefix_segments: int = 1):
        self.model, self.buf, self.buckets, self.device = model, buf, buckets, device
        self.plans: dict[int, list[Segment]] = {}
        vision = Segment("vision", lambda: model.vision(buf))
        spans = model.prefix_spans(prefix_segments)
        for b in buckets:
            segs = [vision] + [Segment(f"prefix{j}[{b}]" if len(spans) > 1 else f"prefix[{b}]",
                                       lambda b=b, s=s: model.prefix(buf, b, s)) for j, s in enumerate(spans)]
            segs += [Segment(f"step{k}[{b}]", lambda b=b, k=k: model.step(buf, b, k)) for k in range(model.num_steps)]
            self.plans[b] = segs
        self.capture_s = 0.0
        self.cuda_graphs = cuda_graphs and device.type == "cuda"  # capture() records them

    @property
    def graphed(self) -> bool:
        return self.plans[self.buckets[0]][0].graph is not None

    def segments(self, bucket: int) -> list[Segment]:
        return self.plans[bucket]

    def run(self, bucket: int) -> None:
        for seg in self.plans[bucket]:
            seg.launch()

    def run_eager(self, bucket: int) -> None:
        """The same inference without graphs (for checking replay and counting kernels)."""
        with torch.inference_mode():
            for seg in self.plans[bucket]:
                seg.fn()

    def capture(self) -> None:
        """Capture every segment of every bucket as a CUDA graph (when enabled, on a GPU), then measure
        every segment's duration: what a scheduler needs to know."""
        if self.cuda_graphs and not self.graphed:
            self._capture()
        for b in self.buckets:
            self.time_segments(b, repeats=3 if self.graphed else 1)

    def _capture(self) -> None:
        t0 = time.perf_counter()
        # Warm up on a side stream first: cuBLAS/cuDNN handles and workspaces are created outside capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b in self.buckets:
                for seg in self.plans[b]:
                    seg.fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        captured: set[int] = set()
        for b in self.buckets:
            for seg in self.plans[b]:
                if id(seg) in captured:  # the vision segment is shared by all buckets
                    continue
                g = torch.cuda.CUDAGraph()
                # thread_local: other threads (a scheduler serving other models) keep launching work
                # while this capture runs; only this thread's CUDA calls are checked against it.
                with torch.cuda.graph(g, pool=pool, stream=side, capture_error_mode="thread_local"):
                    seg.fn()
                seg.graph = g
                captured.add(id(seg))
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0

    def time_segments(self, bucket: int, repeats: int = 5) -> dict[str, float]:
        """Median duration (ms) of each segment of a bucket, measured with CUDA events (wall on CPU)."""
        out = {}
        for seg in self.plans[bucket]:
            ts = []
            for _ in range(repeats):
                if self.device.type == "cuda":
                    a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    seg.launch()
                    z.record()
                    z.synchronize()
                    ts.append(a.elapsed_time(z))
                else:
                    t = time.perf_counter()
                    seg.launch()
                    ts.append((time.perf_counter() - t) * 1e3)
            seg.duration_ms = sorted(ts)[len(ts) // 2]
            out[seg.name] = seg.duration_ms
        return out
