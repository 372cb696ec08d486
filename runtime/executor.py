"""One model's host side of serving: requests in, replies (or published action chunks) out.

The GPU belongs to one scheduler thread shared by every model (runtime/scheduler.py). Per request,
this model's worker thread does the host's share, `policy.prepare` (validation, tokenization, staging
into pinned memory), and submits the job's segments to the scheduler as a Task whose deadline counts
from the request's arrival; the scheduler launches them between other models' segments and hands the
finished (or refused) task back: `on_done` runs on the scheduler thread, so it only queues it. The
worker then reads the result, encodes the reply and passes it to the I/O thread over an inproc PUSH
socket (ZeroMQ sockets are not shared between threads).

Two jobs per model may be in the scheduler at once (flashrt's two staging slots), so request n+1 is
decoded and staged while the GPU runs request n; a job's result is read before the job two after it
is prepared, as the slots require. `reset` waits for the model's earlier jobs: the noise generator it
reseeds is read when a job's inputs are launched.

A periodic model takes no requests: the scheduler calls `release` every period with the newest
observation published to it (on the scheduler thread, so it stages the inputs and nothing more), and
the worker publishes each result, or why there is none, on the PUB socket through the I/O thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable

import zmq

from .models import LoadedModel
from .protocol import DEADLINE, OPENPI, encode
from .request import Request, error_of
from .scheduler import INF, Scheduler, Task
from .stats import ModelStats

log = logging.getLogger("flashrt.runtime")

PIPELINE = 2  # jobs of one model in the scheduler at once: flashrt's two staging slots
RESET = "reset"  # the work of a `reset` request


@dataclass(slots=True)
class Infer:
    """An infer request's work: the engine observation, and how its result becomes the reply."""

    observation: dict
    post: Callable[[dict], Any] | None = None  # e.g. Isaac-GR00T's reply form; None: the result as it is


@dataclass(slots=True)
class Observed:
    """An observation published to a periodic model, decoded by the I/O thread."""

    observation: dict
    encoding: str  # its action chunks are published in the same array encoding


@dataclass(slots=True, eq=False)
class _Running:
    """A task's payload: the job, and whom its result goes to (a request, or the PUB stream)."""

    job: Any
    req: Request | None = None
    work: Infer | None = None
    t_start: float = 0.0
    seq: int = 0
    encoding: str = OPENPI


def prepare(policy: Any, observation: dict) -> Any:
    """`policy.prepare(observation)`: the job whose segments the scheduler launches. A policy with only
    `infer` (a loader's own engine) becomes one segment that runs it whole on the scheduler thread:
    it is served, but nothing can run between its start and its end."""
    if hasattr(policy, "prepare"):
        return policy.prepare(observation)
    return WholeJob(policy, observation)


class WholeJob:
    def __init__(self, policy: Any, observation: dict):
        self.segments = [_Whole(self, policy, observation)]
        self.output: dict | None = None

    def cancel(self) -> None:
        pass

    def result(self) -> dict:
        return self.output


@dataclass(eq=False)
class _Whole:
    job: WholeJob
    policy: Any
    observation: dict
    name: str = "infer"
    duration_ms: float | None = None  # unknown: admission control counts it as nothing

    def launch(self, stream: Any = None) -> None:
        self.job.output = self.policy.infer(self.observation)


class QuietLog:
    """Logs a recurring failure (a periodic model's bad observation, every period) once per distinct
    message and then at most every `every_s`, with how many were not logged."""

    def __init__(self, every_s: float = 10.0):
        self.every_s, self.last, self.at, self.hidden = every_s, None, 0.0, 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if message != self.last or now - self.at >= self.every_s:
            more = f" ({self.hidden} more since the last report)" if self.hidden else ""
            log.warning("%s%s", message, more)
            self.last, self.at, self.hidden = message, now, 0
        else:
            self.hidden += 1


class ModelExecutor:
    def __init__(self, model: LoadedModel, stats: ModelStats, scheduler: Scheduler, ctx: zmq.Context,
                 reply_address: str, publish_address: str, max_queue: int):
        self.model = model
        self.stats = stats
        self.scheduler = scheduler
        self.name = model.config.name
        self.schedule = model.config.schedule
        d = self.schedule.deadline_ms
        self._deadline_s = None if d is None else d / 1e3
        self._ctx = ctx
        self._reply_address = reply_address
        self._publish_address = publish_address
        self._max_queue = max_queue
        self._wall = time.time() - perf_counter()  # perf_counter seconds -> unix seconds, for release_ms
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the three counters below (I/O, worker and scheduler threads)
        self._waiting = 0  # requests accepted and not yet started
        self._closing = False
        self._open_releases = 0  # periodic tasks released and not yet published
        self._quiet = QuietLog()
        if self.schedule.periodic:
            stats.count_event("published", 0)
            stats.count_event("invalid_observations", 0)
        self._thread = threading.Thread(target=self._run, name=f"model-{self.name}", daemon=True)
        self._thread.start()

    # -- from other threads ---------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._waiting

    def submit(self, request: Request, work: Infer | str) -> bool:
        """Queue one request (I/O thread only). False when `max_queue` requests are already waiting."""
        with self._lock:
            if self._waiting >= self._max_queue:
                return False
            self._waiting += 1
        self._events.put(("request", request, work))
        return True

    def close(self) -> None:
        """Finish every request already queued and every released task, on this model, then stop."""
        with self._lock:
            self._closing = True
        self._events.put(("close",))

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def release(self, latest: Observed, release: float) -> Task | None:
        """The scheduler's periodic release (scheduler thread): stage the newest observation. None (a
        skipped release) when closing, when an earlier result still holds a staging slot, or when
        the observation does not fit the model (then the stream gets an error message instead)."""
        with self._lock:
            if self._closing or self._open_releases >= PIPELINE:
                return None
            self._open_releases += 1
        seq = self.scheduler.release_index(self.name, release)
        try:
            job = prepare(self.model.policy, latest.observation)
        except Exception as e:
            with self._lock:
                self._open_releases -= 1
            code, message = error_of(e, quiet=True)
            self.stats.count_event("invalid_observations")
            self._quiet(f"model {self.name!r}: periodic release {seq} skipped, {code}: {message}")
            self._events.put(("publish", {"error": {"code": code, "message": message}, "seq": seq,
                                          "release_ms": self._wall_ms(release)}, latest.encoding))
            return None
        return self._task(job, release, _Running(job, seq=seq, encoding=latest.encoding))

    def _on_done(self, task: Task, error: Exception | None) -> None:
        self._events.put(("done", task, error))  # scheduler thread: hand over, nothing more

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        out = self._ctx.socket(zmq.PUSH)
        out.linger = 1000
        out.connect(self._reply_address)
        pub = None
        if self.schedule.periodic:
            pub = self._ctx.socket(zmq.PUSH)
            pub.linger = 1000
            pub.connect(self._publish_address)
        pending: deque = deque()
        inflight = 0  # this model's request jobs in the scheduler
        closing = False
        try:
            while True:
                event = self._events.get()
                kind = event[0]
                if kind == "request":
                    pending.append(event[1:])
                elif kind == "done":
                    task, error = event[1], event[2]
                    if task.payload.req is None:
                        self._publish(pub, task, error)
                    else:
                        inflight -= 1
                        self._reply(out, task, error)
                elif kind == "publish":
                    self._send_publication(pub, event[1], event[2])
                elif kind == "close":
                    closing = True
                while pending and inflight < PIPELINE:
                    req, work = pending[0]
                    if work is RESET and inflight:
                        break  # after the jobs before it have run
                    pending.popleft()
                    with self._lock:
                        self._waiting -= 1
                    if work is RESET:
                        self._reset(out, req)
                    elif self._start(out, req, work):
                        inflight += 1
                if closing and not pending and not inflight:
                    with self._lock:
                        if self._open_releases == 0:
                            break
        finally:
            out.close()
            if pub is not None:
                pub.close()

    def _task(self, job: Any, release: float, payload: _Running) -> Task:
        # Request arrival and the device clock are both perf_counter seconds.
        deadline = INF if self._deadline_s is None else release + self._deadline_s
        return Task(self.name, list(job.segments), deadline=deadline, priority=self.schedule.priority,
                    realtime=self.schedule.is_realtime, release=release, on_done=self._on_done, payload=payload)

    def _start(self, out: zmq.Socket, req: Request, work: Infer) -> bool:
        """Prepare and submit one request; False if it was answered at once (its observation does not fit)."""
        t_start = perf_counter()
        try:
            job = prepare(self.model.policy, work.observation)
        except Exception as e:
            self._send_error(out, req, e)
            return False
        self.scheduler.submit(self._task(job, req.t_recv, _Running(job, req=req, work=work, t_start=t_start)))
        return True

    def _reply(self, out: zmq.Socket, task: Task, error: Exception | None) -> None:
        run, req = task.payload, task.payload.req
        if error is not None:  # refused by admission control, a failed launch, or the scheduler stopped
            run.job.cancel()
            self._send_error(out, req, error)
            return
        try:
            result = run.job.result()
            payload = result if run.work.post is None else run.work.post(result)
            t_end = perf_counter()
            timing = {"server_ms": (t_end - req.t_recv) * 1e3, "queue_ms": (run.t_start - req.t_ready) * 1e3,
                      "infer_ms": (t_end - run.t_start) * 1e3}
            frames = req.reply(payload, timing)
        except Exception as e:
            self._send_error(out, req, e)
            return
        t_encoded = perf_counter()
        out.send_multipart(frames)  # the reply first, the bookkeeping after
        total, infer = t_encoded - req.t_recv, t_end - run.t_start
        self.stats.record(decode=(req.t_ready - req.t_recv) * 1e3, queue=(run.t_start - req.t_ready) * 1e3,
                          infer=infer * 1e3, encode=(t_encoded - t_end) * 1e3, total=total * 1e3,
                          overhead=(total - infer) * 1e3)

    def _send_error(self, out: zmq.Socket, req: Request, e: BaseException) -> None:
        code, message = error_of(e)
        out.send_multipart(req.error(code, message, {"server_ms": (perf_counter() - req.t_recv) * 1e3}))
        self.stats.record_error(code)

    def _reset(self, out: zmq.Socket, req: Request) -> None:
        t_start = perf_counter()
        try:
            if self.schedule.periodic:
                self._on_scheduler_thread(self.model.policy.reset)  # releases stage and launch there
            else:
                self.model.policy.reset()  # no job of this model is in the scheduler now
            t_end = perf_counter()
            frames = req.reply({}, {"server_ms": (t_end - req.t_recv) * 1e3,
                                    "queue_ms": (t_start - req.t_ready) * 1e3, "infer_ms": (t_end - t_start) * 1e3})
        except Exception as e:
            self._send_error(out, req, e)
            return
        out.send_multipart(frames)
        self.stats.record(queue=(t_start - req.t_ready) * 1e3, infer=(t_end - t_start) * 1e3)

    def _on_scheduler_thread(self, fn: Callable[[], None], timeout_s: float = 30.0) -> None:
        finished, failure = threading.Event(), []

        def call() -> None:
            try:
                fn()
            except Exception as e:  # re-raised on this thread, where it becomes an error reply
                failure.append(e)
            finally:
                finished.set()

        self.scheduler.call_soon(call)
        if not finished.wait(timeout_s):
            raise TimeoutError(f"the scheduler did not run {self.name!r}'s call within {timeout_s:.0f} s")
        if failure:
            raise failure[0]

    # -- periodic results -----------------------------------------------------------------------

    def _wall_ms(self, t: float) -> float:
        return (t + self._wall) * 1e3

    def _publish(self, pub: zmq.Socket, task: Task, error: Exception | None) -> None:
        run = task.payload
        try:
            if error is not None:
                run.job.cancel()
                code, message = error_of(error, quiet=True)
                if code != DEADLINE:  # refusals are in the stats; anything else is worth a look
                    self._quiet(f"model {self.name!r}: periodic release {run.seq} failed, {code}: {message}")
                payload = {"error": {"code": code, "message": message}, "seq": run.seq,
                           "release_ms": self._wall_ms(task.release)}
            else:
                actions = run.job.result()["actions"]
                payload = {"actions": actions, "seq": run.seq, "release_ms": self._wall_ms(task.release),
                           "latency_ms": (perf_counter() - task.release) * 1e3}
                self.stats.count_event("published")
        except Exception as e:
            code, message = error_of(e)
            payload = {"error": {"code": code, "message": message}, "seq": run.seq,
                       "release_ms": self._wall_ms(task.release)}
        finally:
            with self._lock:
                self._open_releases -= 1  # its staging slot is free: the result has been read
        self._send_publication(pub, payload, run.encoding)

    def _send_publication(self, pub: zmq.Socket, payload: dict, encoding: str) -> None:
        pub.send_multipart([self.name.encode(), encode(payload, encoding)])
