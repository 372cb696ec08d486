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
that finds the previous one still running, or that yields no task (`make_task` returned None: say, the
observation was invalid), is skipped and counted as a miss; so are releases the scheduler thread was
held up past (of several due at once, only the newest runs: it is the only one that can be on time).

Threads: `submit`, `publish`, `add_periodic`, `remove_periodic` and `call_soon` may be called from any
thread and wake the scheduler thread at once (it sleeps on an event, not a poll). Decisions (`step`)
run one at a time under a lock, normally on the scheduler thread; but a `submit` that finds the
device idle and no decision under way makes the decision itself, launching what needs no waiting
(any segment on a GPU, whose launches are asynchronous; only a short one on a synchronous device).
Its launch then starts at once instead of one thread wake-up later. `on_done`, `make_task` and the
`call_soon` functions run inside a decision, on either thread, so they must be short.

`mode="fifo"` is the baseline this is measured against: whole inferences in arrival order.

The device is injected: `CudaDevice` (CUDA streams and events), `SyncDevice` (CPU: a segment runs
when launched) or the tests' simulated clock, so the same code is tested exactly on a CPU.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

INF = float("inf")
WINDOW = 10_000  # latency samples kept per model: percentiles are over the most recent ones

log = logging.getLogger("flashrt.runtime")


class Rejected(Exception):
    """Admission control: the request cannot meet its deadline."""

    code = "deadline"


class Cancelled(Exception):
    """The scheduler stopped before the task ran to completion."""

    code = "unavailable"


class Device(Protocol):
    inline_ms: float  # the longest segment a submitting thread may launch itself (0: never)

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
    latencies: list = field(default_factory=list)  # release -> finish, the last `window`
    tardiness: list = field(default_factory=list)  # max(0, finish - deadline) of deadline tasks, the last `window`
    window: int = WINDOW

    def add(self, samples: list, value: float) -> None:
        """Append, keeping about the last `window` samples (trimmed in halves: amortized O(1), and a
        server that runs for weeks does not grow)."""
        samples.append(value)
        if len(samples) > 2 * self.window:
            del samples[: len(samples) - self.window]

    def as_dict(self) -> dict:
        import numpy as np

        lat = np.asarray(list(self.latencies)) * 1e3  # list(): a snapshot, the scheduler thread may append
        tard = np.asarray(list(self.tardiness)) * 1e3

        def pct(a, q):
            return float(np.percentile(a, q)) if len(a) else None

        return {"completed": self.completed, "misses": self.misses, "rejected": self.rejected,
                "skipped": self.skipped, "errors": self.errors,
                "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
                               "max": float(lat.max()) if len(lat) else None, "n": len(lat)},
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
    origin: float = 0.0  # release k happens at origin + k * period


class Scheduler:
    def __init__(self, device: Device, depth: int = 2, mode: str = "edf", window: int = WINDOW):
        if mode not in ("edf", "fifo"):
            raise ValueError(f"unknown scheduling mode {mode!r}")
        self.device, self.depth, self.mode, self.window = device, depth, mode, window
        self.ready: list[tuple] = []  # heap of (key, task)
        self.inflight: deque = deque()  # (token, task, last segment of the task?)
        self.tally: dict[str, ModelTally] = {}
        self.periodic: dict[str, Periodic] = {}
        self._seq = itertools.count()
        self._inbox: deque = deque()  # tasks submitted from other threads
        self._calls: deque = deque()  # functions to run on the scheduler thread (call_soon)
        self._lock = threading.Lock()
        self._deciding = threading.Lock()  # one decision (step) at a time, whichever thread makes it
        self._wake = threading.Event()  # set by every hand-over, so an idle scheduler reacts at once
        self.trace: list | None = None  # [model, segment, launch time, completion seen] when set to a list

    # -- submission (any thread) ---------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; the next decision admits (or rejects) it. When nothing is running and no
        decision is under way, that decision is made here, on the caller's thread (see the top)."""
        with self._lock:
            self._inbox.append(task)
        if getattr(self.device, "inline_ms", 0) > 0 and self._deciding.acquire(blocking=False):
            try:
                if not self.inflight and not self.ready:
                    while self.step(inline=True) and self.ready:  # nothing ready: no launch left to make here
                        pass
            finally:
                self._deciding.release()
            with self._lock:
                idle = not self.inflight and not self.ready and not self._inbox
            if idle:  # everything ran here: nothing for the scheduler thread to wait for
                return
        self._wake.set()

    def add_periodic(self, model: str, period_s: float, make_task: Callable[[Any, float], Task | None]) -> None:
        """Release `make_task(newest observation, release time)` every period. Replacing a model's
        entry with the same period (a model swap) keeps its phase and its newest observation, so the
        stream's release times do not move and a control loop sees no gap."""
        with self._lock:
            old = self.periodic.get(model)
            if old is not None and old.period == period_s:
                self.periodic[model] = Periodic(model, period_s, make_task, next_release=old.next_release,
                                                latest=old.latest, origin=old.origin)
            else:
                now = self.device.now()
                self.periodic[model] = Periodic(model, period_s, make_task, next_release=now + period_s, origin=now)
        self._wake.set()

    def remove_periodic(self, model: str) -> None:
        """No more releases for `model` (a task already released still runs to completion)."""
        with self._lock:
            self.periodic.pop(model, None)

    def publish(self, model: str, observation: Any) -> None:
        """The newest observation for a periodic model (only the newest is kept)."""
        with self._lock:
            self.periodic[model].latest = observation

    def release_index(self, model: str, release: float) -> int:
        """k for the release at origin + k * period: consecutive releases differ by one, so a gap says
        how many were skipped or refused."""
        p = self.periodic.get(model)
        return -1 if p is None else round((release - p.origin) / p.period)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the scheduler thread before its next decision (e.g. a periodic model's reset,
        which must not race with the launches that read its state)."""
        with self._lock:
            self._calls.append(fn)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def tally_for(self, model: str) -> ModelTally:
        tally = self.tally.get(model)
        if tally is None:
            tally = self.tally[model] = ModelTally(window=self.window)
        return tally

    # -- admission ------------------------------------------------------------------------------

    def estimate_finish(self, task: Task, now: float) -> float:
        """When `task` would finish if admitted now: the work ordered before it, the segments already
        on the GPU (not preemptible), then its own segments."""
        return now + sum(self._estimate_parts(task)) / 1e3

    def _estimate_parts(self, task: Task) -> tuple[float, float, float]:
        """(work ordered before it, segments on the GPU, its own segments), in ms."""
        ahead = sum(t.remaining_ms for _, t in self.ready if t.key() < task.key())
        on_gpu = sum(t.seg_ms(i) for _, t, i, _ in self.inflight)
        return ahead, on_gpu, task.remaining_ms

    def _admit(self, task: Task, now: float) -> None:
        tally = self.tally_for(task.model)
        task.seq = next(self._seq)
        if self.mode == "edf" and task.deadline < INF:
            eta = self.estimate_finish(task, now)
            if eta > task.deadline:
                tally.rejected += 1
                tally.misses += 1
                task.finished = now
                if task.on_done is not None:
                    ahead, on_gpu, own = self._estimate_parts(task)
                    task.on_done(task, Rejected(
                        f"model {task.model!r} cannot meet its deadline: estimated {(eta - task.release) * 1e3:.1f} ms "
                        f"from release, deadline {(task.deadline - task.release) * 1e3:.1f} ms (decided "
                        f"{(now - task.release) * 1e3:.1f} ms after release; {ahead:.1f} ms of other work first, "
                        f"{on_gpu:.1f} ms on the GPU, {own:.1f} ms its own)"))
                return
        key = (0, 0, task.seq) if self.mode == "fifo" else task.key()
        heapq.heappush(self.ready, (key, task))

    def _due_releases(self, now: float) -> list:
        """(periodic entry, observation, release time) of every release due now (under the lock)."""
        due = []
        for p in self.periodic.values():
            overdue = []
            while p.next_release <= now:
                overdue.append(p.next_release)
                p.next_release += p.period
            if not overdue or p.latest is None:
                continue
            # Late by more than a period (the thread was held up): only the newest release can still be
            # on time; the older ones are skipped, as is a release whose predecessor is still running.
            skipped = len(overdue) - 1
            if p.running is not None and p.running.finished is None:
                skipped += 1
            else:
                due.append((p, p.latest, overdue[-1]))
                p.running = _PENDING  # being made; a release before it is done sees it running
            if skipped:
                tally = self.tally_for(p.model)
                tally.skipped += skipped
                tally.misses += skipped
        return due

    def _release(self, due: list, now: float) -> None:
        """Make and admit the due tasks, outside the lock: make_task may take a while (it stages
        the observation) and other threads must not wait for it."""
        for p, latest, release in due:
            try:
                task = p.make_task(latest, release)
            except Exception:  # a broken make_task skips its release, never stops the scheduler
                log.exception("periodic release of %r failed", p.model)
                task = None
            if task is None:
                p.running = None
                tally = self.tally_for(p.model)
                tally.skipped += 1
                tally.misses += 1
                continue
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
            tally = self.tally_for(task.model)
            tally.completed += 1
            tally.add(tally.latencies, task.finished - task.release)
            if task.deadline < INF:
                late = task.finished - task.deadline
                tally.add(tally.tardiness, max(0.0, late))
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
            self.tally_for(task.model).errors += 1
            if task.on_done is not None:
                task.on_done(task, e)
            return
        task.next += 1
        self.inflight.append((token, task, i, entry))

    def step(self, inline: bool = False) -> bool:
        """One scheduling decision (under `_deciding`). Returns False when there was nothing to do, or,
        `inline` (a submitting thread's decision), when the next thing would be a wait or a launch
        longer than the device's `inline_ms`."""
        now = self.device.now()
        with self._lock:
            inbox = calls = ()  # taken over only when non-empty: no new deque per decision
            if self._inbox:
                inbox, self._inbox = self._inbox, deque()
            if self._calls:
                calls, self._calls = self._calls, deque()
            due = self._due_releases(now) if self.periodic else ()
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("a call handed to the scheduler failed")
        if due:
            self._release(due, now)
        if inbox:
            for task in inbox:
                self._admit(task, now)
        self._reap()
        if len(self.inflight) < self.depth and self.ready:
            _, task = self.ready[0]
            if inline and not self._fits_inline(task):
                return False
            if self.mode == "fifo":  # the baseline: a whole inference at once, in arrival order
                heapq.heappop(self.ready)
                while task.next < len(task.segments):
                    self._launch_next(task)
            else:
                self._launch_next(task)
                if task.next == len(task.segments) and self.ready and self.ready[0][1] is task:
                    heapq.heappop(self.ready)
            self._reap()  # a synchronous device has finished it already: hand it back in this decision
            return True
        if self.inflight and not inline:
            self.device.wait(self.inflight[0][0])
            self._finish_head()
            return True
        return False

    def _fits_inline(self, task: Task) -> bool:
        """Whether a submitting thread may launch the next segment (a whole task in fifo mode): only
        segments of known duration, up to the device's `inline_ms`."""
        if self.mode == "fifo":
            durations = [getattr(seg, "duration_ms", None) for seg in task.segments[task.next:]]
            return None not in durations and sum(durations) <= self.device.inline_ms
        duration = getattr(task.segments[task.next], "duration_ms", None)
        return duration is not None and duration <= self.device.inline_ms

    def cancel_pending(self, reason: str = "the scheduler stopped") -> int:
        """Fail every task not fully launched (call once the scheduler thread has stopped): their
        owners get on_done(task, Cancelled) and can release what they hold. Returns how many."""
        with self._lock:
            pending = list(self._inbox) + [t for _, t in self.ready]
            self._inbox.clear()
            self.ready.clear()
        for task in pending:
            task.finished = self.device.now()
            if task.on_done is not None:
                task.on_done(task, Cancelled(reason))
        return len(pending)

    def next_wakeup(self) -> float:
        with self._lock:
            return min((p.next_release for p in self.periodic.values()), default=INF)

    def run(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """The scheduler thread: decide, launch, wait; when idle, sleep until the next release or a
        hand-over from another thread wakes it (`poll_s` only bounds the sleep)."""
        while not stop.is_set():
            self._wake.clear()  # before looking for work: a hand-over from now on ends the sleep below
            try:
                with self._deciding:
                    busy = self.step()
            except Exception:  # a bug in a callback must not stop every model's GPU work
                log.exception("scheduler step failed")
                busy = False
            if not busy:
                self._wake.wait(max(0.0, min(poll_s, self.next_wakeup() - self.device.now())))


_PENDING = Task("", [], INF)  # marks a periodic release being made (not finished)


# ---------------------------------------------------------------------------------------------
# Devices


class SyncDevice:
    """CPU execution: a segment runs to completion when launched."""

    inline_ms = 0.2  # a submitting thread (the server's I/O thread) may run a segment this short itself

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

    inline_ms = INF  # launches are asynchronous: any thread may launch without waiting for the GPU

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
