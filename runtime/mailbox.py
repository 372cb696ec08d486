"""Calls handed to the I/O thread from other threads (the scheduler, loaders), waking its poll.

A queue plus a pipe whose read end sits in the I/O thread's zmq.Poller: any thread may `post`, and
one byte on the pipe ends the poll at once. It replaces an inproc socket per thread (ZeroMQ sockets
belong to one thread, and the scheduler thread must not own one just to say "done"). A post from
the I/O thread itself (a request whose work finished inline) writes no byte: that thread looks at
the queue before it polls again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Callable

log = logging.getLogger("flashrt.runtime")


class Mailbox:
    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()  # a post racing close() must not write to a reused descriptor
        self._closed = False
        self.owner: int | None = None  # threading.get_ident() of the thread that runs the calls

    def fileno(self) -> int:
        """The file descriptor to poll for POLLIN."""
        return self._read

    def post(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread soon (any thread)."""
        self._calls.put(fn)
        if threading.get_ident() == self.owner:
            return
        with self._lock:
            if self._closed:  # the server has stopped: nobody is left to run it
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already: the poll ends anyway
                pass

    def empty(self) -> bool:
        return self._calls.empty()

    def run(self, woken: bool = True) -> None:
        """Run every posted call (I/O thread). A failing call is logged; the rest still run. `woken`:
        the pipe was readable, so its wake-up bytes are drained (else only the I/O thread's own posts,
        which write none, are waiting, or bytes a later poll will report)."""
        if woken:
            try:
                while len(os.read(self._read, 4096)) == 4096:
                    pass
            except BlockingIOError:  # nothing to read: the call was found by empty() before its wake-up byte
                pass
        while not self._calls.empty():  # one consumer: empty() is exact, and cheaper than raising Empty
            try:
                self._calls.get_nowait()()
            except Exception:  # a bug in a hand-over must not stop the I/O loop
                log.exception("a task handed to the I/O thread failed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self._read)
            os.close(self._write)
