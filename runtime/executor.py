"""Where a model's work leaves the I/O thread: one worker thread per loaded model, requests in order.

`policy.infer` is not thread-safe and may take tens of milliseconds, so each loaded model gets one
thread that runs its requests one at a time; the I/O thread only validates and enqueues. The worker
encodes the reply itself and hands it back over an inproc PUSH socket (ZeroMQ sockets are not shared
between threads). A scheduler that interleaves several models' GPU work replaces this class.
"""

from __future__ import annotations

import queue
import threading
from time import perf_counter
from typing import Any, Callable

import zmq

from .models import LoadedModel
from .request import Request, error_of
from .stats import ModelStats

Work = Callable[[Any], Any]  # policy -> reply payload


class ModelExecutor:
    def __init__(self, model: LoadedModel, stats: ModelStats, ctx: zmq.Context, reply_address: str, max_queue: int):
        self.model = model
        self.stats = stats
        self._ctx = ctx
        self._reply_address = reply_address
        self._max_queue = max_queue
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"model-{model.config.name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._jobs.qsize()

    def submit(self, request: Request, work: Work) -> bool:
        """Queue one request (I/O thread only). False when the queue is full."""
        if self._jobs.qsize() >= self._max_queue:
            return False
        self._jobs.put((request, work))
        return True

    def close(self) -> None:
        """Finish every request already queued, on this model, then stop the thread."""
        self._jobs.put(None)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        out = self._ctx.socket(zmq.PUSH)
        out.linger = 1000
        out.connect(self._reply_address)
        try:
            while (job := self._jobs.get()) is not None:
                self._execute(out, *job)
        finally:
            out.close()

    def _execute(self, out: zmq.Socket, request: Request, work: Work) -> None:
        t_start = perf_counter()
        try:
            payload = work(self.model.policy)
            t_end = perf_counter()
            timing = {"server_ms": (t_end - request.t_recv) * 1e3, "queue_ms": (t_start - request.t_ready) * 1e3,
                      "infer_ms": (t_end - t_start) * 1e3}
            frames = request.reply(payload, timing)
        except Exception as e:
            code, message = error_of(e)
            out.send_multipart(request.error(code, message, {"server_ms": (perf_counter() - request.t_recv) * 1e3}))
            self.stats.record_error(code)
            return
        t_encoded = perf_counter()
        out.send_multipart(frames)  # the reply first, the bookkeeping after
        total, infer = t_encoded - request.t_recv, t_end - t_start
        self.stats.record(decode=(request.t_ready - request.t_recv) * 1e3, queue=(t_start - request.t_ready) * 1e3,
                          infer=infer * 1e3, encode=(t_encoded - t_end) * 1e3, total=total * 1e3,
                          overhead=(total - infer) * 1e3)
