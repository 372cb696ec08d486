"""One model's serving state, owned by the server's I/O thread: requests in, replies (or published
action chunks) out.

The GPU belongs to one scheduler thread shared by every model (runtime/scheduler.py). Per request,
the I/O thread does the host's share here: `policy.prepare` (validation, tokenization, staging into
pinned memory) and submits the job's segments to the scheduler as a Task whose deadline counts from
the request's arrival. The scheduler launches them between other models' segments; `on_done` runs
on the scheduler thread and only posts the task back to the I/O thread, which reads the result,
encodes the reply and sends it. So a request wakes two threads, the scheduler and then the I/O
thread again, and nothing else.

Two jobs per model may be in the scheduler at once (flashrt's two staging slots), so request n+1 is
staged while the GPU runs request n; later requests wait in `pending`, because a job's result must be
read before the job two after it is prepared. `reset` waits for the model's earlier jobs, so it
applies to the requests after it whatever state a policy reads when its segments launch (flashrt's
noise is drawn when a job is prepared, a loader's own policy may read its state later).

A periodic model takes no infer requests: the scheduler calls `release` every period with the newest
observation published to it (on the scheduler thread, so it stages the inputs and nothing more), and
each result, or why there is none, is published on the PUB socket by the I/O thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import Any, Callable

from .mailbox import Mailbox
from .models import LoadedModel
from .protocol import DEADLINE, OPENPI, encode
from .request import Request, error_of
from .scheduler import INF, Scheduler, Task
from .stats import ModelStats

log = logging.getLogger("flashrt.runtime")

PIPELINE = 2  # jobs of one model in the scheduler at once: flashrt's two staging slots
RESET = "reset"  # the work of a `reset` request

Send = Callable[[list], None]


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
    prepare_s: float = 0.0  # policy.prepare: host staging, the model's own work
    seq: int = 0
    encoding: str = OPENPI


class WholePolicy:
    """A policy with only `infer` (a loader's own engine), given `prepare`: its job is one segment that
    runs the whole inference on the scheduler thread. It is served, but nothing can run between its
    start and its end. The segment's duration, unknown at first, is learned from its runs (smoothed)
    for admission control and inline launches (runtime/scheduler.py)."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.duration_ms: float | None = None

    def prepare(self, observation: dict) -> "WholeJob":
        return WholeJob(self, observation)


class WholeJob:
    def __init__(self, owner: WholePolicy, observation: dict):
        self.segments = [_Whole(owner, observation)]

    def cancel(self) -> None:
        pass

    def result(self) -> dict:
        return self.segments[0].output


@dataclass(eq=False)
class _Whole:
    """The job's one segment. It keeps the output itself: a reference back to its job would be a
    cycle, and the request (its frames: images read in place) would then live on until Python's
    cycle collector ran, freeing many requests' buffers at once. That churn cost 2-4 page faults
    and 30-60 us of round trip per request on the 2-core VM (benchmarks/runtime_overhead.py);
    test_a_request_is_freed_when_answered."""

    owner: WholePolicy
    observation: dict
    name: str = "infer"
    output: dict | None = None

    @property
    def duration_ms(self) -> float | None:
        return self.owner.duration_ms

    def launch(self, stream: Any = None) -> None:
        t0 = perf_counter()
        self.output = self.owner.policy.infer(self.observation)  # synchronous: returns host arrays
        ms, seen = (perf_counter() - t0) * 1e3, self.owner.duration_ms
        self.owner.duration_ms = ms if seen is None else 0.8 * seen + 0.2 * ms


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
    """Every method runs on the I/O thread except `release` and `_on_done` (scheduler thread)."""

    def __init__(self, model: LoadedModel, stats: ModelStats, scheduler: Scheduler, mailbox: Mailbox,
                 send: Send, publish: Send, max_queue: int):
        self.model = model
        self.stats = stats
        self.scheduler = scheduler
        self.name = model.config.name
        self.schedule = model.config.schedule
        d = self.schedule.deadline_ms
        self._deadline_s = None if d is None else d / 1e3
        self._mailbox = mailbox
        self._send = send  # reply frames to the ROUTER socket
        self._publish = publish  # [topic, body] to the PUB socket
        self._max_queue = max_queue
        self._wall = time.time() - perf_counter()  # perf_counter seconds -> unix seconds, for release_ms
        self._pending: deque = deque()  # (request, work) accepted and not yet started
        self._inflight = 0  # this model's request jobs in the scheduler (and a periodic reset under way)
        self._closing = False
        self._lock = threading.Lock()  # guards the two fields below (I/O and scheduler threads)
        self._releasing = True  # periodic releases still taken
        self._open_releases = 0  # periodic tasks released and not yet published
        self._quiet = QuietLog()
        policy = model.policy
        self._policy = policy if hasattr(policy, "prepare") else WholePolicy(policy)  # what jobs come from
        if self.schedule.periodic:
            stats.count_event("published", 0)
            stats.count_event("invalid_observations", 0)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, request: Request, work: Infer | str) -> bool:
        """Take one request. False when `max_queue` requests are already waiting."""
        if len(self._pending) >= self._max_queue:
            return False
        self._pending.append((request, work))
        self._pump()
        return True

    def close(self) -> None:
        """Finish every request already taken and every released task, on this model; take no more releases."""
        self._closing = True
        with self._lock:
            self._releasing = False

    def done(self) -> bool:
        with self._lock:
            releases = self._open_releases
        return self._closing and not self._pending and not self._inflight and not releases

    def _pump(self) -> None:
        """Start waiting requests while a staging slot is free."""
        while self._pending and self._inflight < PIPELINE:
            req, work = self._pending[0]
            if work is RESET and self._inflight:
                return  # after the jobs before it have run
            self._pending.popleft()
            if work is RESET:
                self._reset(req)
            else:
                self._start(req, work)

    def _task(self, job: Any, release: float, payload: _Running) -> Task:
        # Request arrival and the device clock are both perf_counter seconds.
        deadline = INF if self._deadline_s is None else release + self._deadline_s
        return Task(self.name, list(job.segments), deadline=deadline, priority=self.schedule.priority,
                    realtime=self.schedule.is_realtime, release=release, on_done=self._on_done, payload=payload)

    def _start(self, req: Request, work: Infer) -> None:
        t_start = perf_counter()
        try:
            job = self._policy.prepare(work.observation)
        except Exception as e:  # the observation does not fit the model
            self._send_error(req, e)
            return
        run = _Running(job, req=req, work=work, prepare_s=perf_counter() - t_start)
        self._inflight += 1
        self.scheduler.submit(self._task(job, req.t_recv, run))

    def _on_done(self, task: Task, error: Exception | None) -> None:
        """Scheduler thread: hand the finished (or refused) task back, nothing more."""
        self._mailbox.post(partial(self._finished, task, error))

    def _finished(self, task: Task, error: Exception | None) -> None:
        if task.payload.req is None:
            self._publish_result(task, error)
        else:
            self._slot_freed(partial(self._reply, task, error))

    def _slot_freed(self, answer: Callable[[], None]) -> None:
        """A request job (or a periodic reset) of this model is over: answer it, then start what waits."""
        self._inflight -= 1
        try:
            answer()
        finally:
            self._pump()

    def _reply(self, task: Task, error: Exception | None) -> None:
        run, req = task.payload, task.payload.req
        if error is not None:  # refused by admission control, a failed launch, or the scheduler stopped
            run.job.cancel()
            self._send_error(req, error)
            return
        try:
            result = run.job.result()
            payload = result if run.work.post is None else run.work.post(result)
            model_s = run.prepare_s + (task.finished - task.launched_at)  # staging + launch to completion
            queue_s = task.launched_at - req.t_ready - run.prepare_s  # waiting: our slots, the scheduler, other models
            timing = {"server_ms": (perf_counter() - req.t_recv) * 1e3, "queue_ms": queue_s * 1e3,
                      "infer_ms": model_s * 1e3}
            frames = req.reply(payload, timing)
        except Exception as e:
            self._send_error(req, e)
            return
        t_encoded = perf_counter()
        self._send(frames)  # the reply first, the bookkeeping after
        total = t_encoded - req.t_recv
        self.stats.record(decode=(req.t_ready - req.t_recv) * 1e3, queue=queue_s * 1e3, infer=model_s * 1e3,
                          encode=(t_encoded - task.finished) * 1e3, total=total * 1e3,
                          overhead=(total - model_s) * 1e3)

    def _send_error(self, req: Request, e: BaseException) -> None:
        code, message = error_of(e)
        self._send(req.error(code, message, {"server_ms": (perf_counter() - req.t_recv) * 1e3}))
        self.stats.record_error(code)

    def _reset(self, req: Request) -> None:
        """No job of this model is in the scheduler now. A periodic model's releases stage and launch on
        the scheduler thread, so its reset runs there, between two decisions."""
        t_start = perf_counter()
        if not self.schedule.periodic:
            self._reset_done(req, t_start, self._call(self.model.policy.reset))
            return
        self._inflight += 1

        def on_scheduler_thread() -> None:
            error = self._call(self.model.policy.reset)
            self._mailbox.post(partial(self._slot_freed, partial(self._reset_done, req, t_start, error)))

        self.scheduler.call_soon(on_scheduler_thread)

    @staticmethod
    def _call(fn: Callable[[], None]) -> Exception | None:
        try:
            fn()
        except Exception as e:  # becomes the request's error reply
            return e
        return None

    def _reset_done(self, req: Request, t_start: float, error: Exception | None) -> None:
        if error is not None:
            self._send_error(req, error)
            return
        t_end = perf_counter()
        self._send(req.reply({}, {"server_ms": (t_end - req.t_recv) * 1e3, "queue_ms": (t_start - req.t_ready) * 1e3,
                                  "infer_ms": (t_end - t_start) * 1e3}))
        self.stats.record(queue=(t_start - req.t_ready) * 1e3, infer=(t_end - t_start) * 1e3)

    # -- periodic releases ----------------------------------------------------------------------

    def release(self, latest: Observed, release: float) -> Task | None:
        """The scheduler's periodic release (scheduler thread): stage the newest observation. None (a
        skipped release) when closing, when an earlier result still holds a staging slot, or when
        the observation does not fit the model (then the stream gets an error message instead)."""
        with self._lock:
            if not self._releasing or self._open_releases >= PIPELINE:
                return None
            self._open_releases += 1
        seq = self.scheduler.release_index(self.name, release)
        try:
            job = self._policy.prepare(latest.observation)
        except Exception as e:
            with self._lock:
                self._open_releases -= 1
            code, message = error_of(e, quiet=True)
            self.stats.count_event("invalid_observations")
            self._quiet(f"model {self.name!r}: periodic release {seq} skipped, {code}: {message}")
            self._mailbox.post(partial(self._send_publication, {
                "error": {"code": code, "message": message}, "seq": seq, "release_ms": self._wall_ms(release)},
                latest.encoding))
            return None
        return self._task(job, release, _Running(job, seq=seq, encoding=latest.encoding))

    def _wall_ms(self, t: float) -> float:
        return (t + self._wall) * 1e3

    def _publish_result(self, task: Task, error: Exception | None) -> None:
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
        self._send_publication(payload, run.encoding)

    def _send_publication(self, payload: dict, encoding: str) -> None:
        self._publish([self.name.encode(), encode(payload, encoding)])
