"""Earliest-deadline-first scheduling of several models' segments on one GPU.

Each inference is a `Task`: the segments of a flashrt Job (inputs, vision, prefix, flow steps,
output), an absolute deadline (infinite for best-effort work) and a priority. Between segments the
scheduler launches the next segment of the most urgent ready task, ordered by (priority descending,
deadline ascending, arrival). It keeps only `depth` segments in flight on the GPU, so a request that
arrives now waits at most for the segments already launched (one segment is a few hundred
microseconds to a few milliseconds), never for another model's whole inference. Real-time models
run on a high-priority CUDA stream, the rest on a low-priority one.

Admission control: a request with a deadline is refused at once, with the estimate in the error,
when the work that would run before it plus its own cannot finish by its deadline (durations are
the segments' measured times), instead of making every request late.

Periodic models release a task every period on the newest observation published to them; a release
that finds the previous one still running is skipped and counted as a miss.

`mode="fifo"` is the baseline this is measured against: whole inferences in arrival order.

The device is injected: `CudaDevice` (CUDA streams and events), `SyncDevice` (CPU: a segment runs
when launched) or the tests' simulated clock, so the same code is tested exactly on a CPU.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

INF = float("inf")


class Rejected(Exception):
    """Admission control: the request cannot meet its deadline."""

    code = "deadline"


class Device(Protocol):
    def now(self) -> float: ...
    def launch(self, segment: Any, realtime: bool) -> Any: ...  # returns a completion token
    def done(self, token: Any) -> bool: ...
    def wait(self, token: Any) -> None: ...
    def idle(self, seconds: float) -> None: ...  # nothing to do: wait this long (or until woken)


@dataclass
class Task:
    model: str
    segments: list  # objects with .launch(stream) and .duration_ms (float or None)
    deadline: float  # absolute, seconds on the device clock; INF: best effort
    priority: int = 0
    realtime: bool = False
    release: float = 0.0
    on_done: Callable[["Task", Exception | None], None] | None = None  # (task, None or the rejection)
    payload: Any = None  # whatever the caller needs back (the Job, the request)
    seq: int = 0
    next: int = 0  # index of the next segment to launch
    launched_at: float | None = None
    finished: float | None = None

    def key(self) -> tuple:
        return (-self.priority, self.deadline, self.seq)

    def seg_ms(self, i: int) -> float:
        d = getattr(self.segments[i], "duration_ms", None)
        return d if d is not None else 0.05

    @property
    def remaining_ms(self) -> float:
        return sum(self.seg_ms(i) for i in range(self.next, len(self.segments)))

    @property
    def total_ms(self) -> float:
        return sum(self.seg_ms(i) for i in range(len(self.segments)))


@dataclass
class ModelTally:
    """Per-model outcome counts and latencies (seconds), read by the runtime's `stats`."""

    completed: int = 0
    misses: int = 0  # finished after the deadline, or a periodic release skipped/refused
    rejected: int = 0
    skipped: int = 0
    errors: int = 0
    latencies: list = field(default_factory=list)  # release -> finish
    tardiness: list = field(default_factory=list)  # max(0, finish - deadline) of deadline tasks

    def as_dict(self) -> dict:
        import numpy as np

        lat = np.asarray(self.latencies) * 1e3
        tard = np.asarray(self.tardiness) * 1e3
        pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else None)
        return {"completed": self.completed, "misses": self.misses, "rejected": self.rejected,
                "skipped": self.skipped, "errors": self.errors, "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99),
                                                        "max": float(lat.max()) if len(lat) else None},
                "tardiness_ms": {"mean": float(tard.mean()) if len(tard) else 0.0,
                                 "max": float(tard.max()) if len(tard) else 0.0}}


@dataclass
class Periodic:
    model: str
    period: float  # seconds
    make_task: Callable[[Any, float], Task | None]  # (observation, release time) -> task
    next_release: float
    latest: Any = None  # newest published observation
    running: Task | None = None


class Scheduler:
    def __init__(self, device: Device, depth: int = 2, mode: str = "edf"):
        if mode not in ("edf", "fifo"):
            raise ValueError(f"unknown scheduling mode {mode!r}")
        self.device, self.depth, self.mode = device, depth, mode
        self.ready: list[tuple] = []  # heap of (key, task)
        self.inflight: deque = deque()  # (token, task, last segment of the task?)
        self.tally: dict[str, ModelTally] = {}
        self.periodic: dict[str, Periodic] = {}
        self._seq = itertools.count()
        self._inbox: deque = deque()  # tasks submitted from other threads
        self._lock = threading.Lock()
        self.trace: list | None = None  # [model, segment, launch time, completion seen] when set to a list

    # -- submission (any thread) ---------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; the scheduler thread admits (or rejects) it at its next decision."""
        with self._lock:
            self._inbox.append(task)

    def add_periodic(self, model: str, period_s: float, make_task: Callable[[Any, float], Task | None]) -> None:
        with self._lock:
            self.periodic[model] = Periodic(model, period_s, make_task, next_release=self.device.now() + period_s)

    def publish(self, model: str, observation: Any) -> None:
        """The newest observation for a periodic model (only the newest is kept)."""
        with self._lock:
            self.periodic[model].latest = observation

    # -- admission ------------------------------------------------------------------------------

    def estimate_finish(self, task: Task, now: float) -> float:
        """When `task` would finish if admitted now: the work ordered before it, the segments already
        on the GPU (not preemptible), then its own segments."""
        ahead = sum(t.remaining_ms for _, t in self.ready if t.key() < task.key())
        on_gpu = sum(t.seg_ms(i) for _, t, i, _ in self.inflight)
        return now + (ahead + on_gpu + task.remaining_ms) / 1e3

    def _admit(self, task: Task, now: float) -> None:
        tally = self.tally.setdefault(task.model, ModelTally())
        task.seq = next(self._seq)
        if self.mode == "edf" and task.deadline < INF:
            eta = self.estimate_finish(task, now)
            if eta > task.deadline:
                tally.rejected += 1
                tally.misses += 1
                task.finished = now
                if task.on_done is not None:
                    task.on_done(task, Rejected(f"model {task.model!r} cannot meet its deadline: estimated "
                                                f"{(eta - task.release) * 1e3:.1f} ms from release, deadline "
                                                f"{(task.deadline - task.release) * 1e3:.1f} ms"))
                return
        key = (0, 0, task.seq) if self.mode == "fifo" else task.key()
        heapq.heappush(self.ready, (key, task))

    def _release_periodic(self, now: float) -> None:
        for p in self.periodic.values():
            while p.next_release <= now:
                release = p.next_release
                p.next_release += p.period
                if p.latest is None:
                    continue
                tally = self.tally.setdefault(p.model, ModelTally())
                if p.running is not None and p.running.finished is None:
                    tally.skipped += 1
                    tally.misses += 1
                    continue
                task = p.make_task(p.latest, release)
                if task is not None:
                    task.release = release
                    p.running = task
                    self._admit(task, now)

    # -- the loop -------------------------------------------------------------------------------

    def _reap(self) -> None:
        while self.inflight and self.device.done(self.inflight[0][0]):
            self._finish_head()

    def _finish_head(self) -> None:
        token, task, i, entry = self.inflight.popleft()
        if entry is not None:
            entry[3] = self.device.now()
        if i == len(task.segments) - 1:
            task.finished = self.device.now()
            tally = self.tally.setdefault(task.model, ModelTally())
            tally.completed += 1
            tally.latencies.append(task.finished - task.release)
            if task.deadline < INF:
                late = task.finished - task.deadline
                tally.tardiness.append(max(0.0, late))
                tally.misses += late > 0
            if task.on_done is not None:
                task.on_done(task, None)

    def _launch_next(self, task: Task) -> None:
        i = task.next
        if task.launched_at is None:
            task.launched_at = self.device.now()
        entry = None
        if self.trace is not None:
            entry = [task.model, getattr(task.segments[i], "name", str(i)), self.device.now(), None]
            self.trace.append(entry)
        try:
            token = self.device.launch(task.segments[i], task.realtime)
        except Exception as e:  # a failed launch fails its task, never the scheduler
            task.next = len(task.segments)
            task.finished = self.device.now()
            self.tally.setdefault(task.model, ModelTally()).errors += 1
            if task.on_done is not None:
                task.on_done(task, e)
            return
        task.next += 1
        self.inflight.append((token, task, i, entry))

    def step(self) -> bool:
        """One scheduling decision. Returns False when there was nothing to do."""
        now = self.device.now()
        with self._lock:
            inbox, self._inbox = self._inbox, deque()
            self._release_periodic(now)
        for task in inbox:
            self._admit(task, now)
        self._reap()
        if len(self.inflight) < self.depth and self.ready:
            _, task = self.ready[0]
            if self.mode == "fifo":  # the baseline: a whole inference at once, in arrival order
                heapq.heappop(self.ready)
                while task.next < len(task.segments):
                    self._launch_next(task)
            else:
                self._launch_next(task)
                if task.next == len(task.segments) and self.ready and self.ready[0][1] is task:
                    heapq.heappop(self.ready)
            return True
        if self.inflight:
            self.device.wait(self.inflight[0][0])
            self._finish_head()
            return True
        return False

    def next_wakeup(self) -> float:
        with self._lock:
            return min((p.next_release for p in self.periodic.values()), default=INF)

    def run(self, stop: threading.Event, poll_s: float = 0.002) -> None:
        """The scheduler thread: decide, launch, wait; when idle, sleep until a release or `poll_s`."""
        while not stop.is_set():
            if not self.step():
                self.device.idle(max(0.0, min(poll_s, self.next_wakeup() - self.device.now())))


# ---------------------------------------------------------------------------------------------
# Devices


class SyncDevice:
    """CPU execution: a segment runs to completion when launched."""

    def now(self) -> float:
        return time.perf_counter()

    def launch(self, segment: Any, realtime: bool) -> None:
        segment.launch()

    def done(self, token: Any) -> bool:
        return True

    def wait(self, token: Any) -> None:
        pass

    def idle(self, seconds: float) -> None:
        time.sleep(seconds)


class CudaDevice:
    """Segments on two CUDA streams (high priority for real-time work), completion by events."""

    def __init__(self, device: Any = None):
        import torch

        self.torch = torch
        lo, hi = torch.cuda.Stream.priority_range()
        self.streams = {True: torch.cuda.Stream(device, priority=hi), False: torch.cuda.Stream(device, priority=lo)}

    def now(self) -> float:
        return time.perf_counter()

    def launch(self, segment: Any, realtime: bool) -> Any:
        stream = self.streams[realtime]
        with self.torch.inference_mode():
            segment.launch(stream)
        ev = self.torch.cuda.Event()
        ev.record(stream)
        return ev

    def done(self, token: Any) -> bool:
        return token.query()

    def wait(self, token: Any) -> None:
        token.synchronize()

    def idle(self, seconds: float) -> None:
        time.sleep(seconds)
