"""A FlashRT policy client for robot computers: needs only pyzmq, msgpack and numpy.

    client = PolicyClient("tcp://robot-server:5555")
    actions = client.infer({"images": {"base_0_rgb": img}, "state": state, "prompt": "fold the towel"})["actions"]

Every call has a timeout. On a timeout the client follows ZeroMQ's Lazy Pirate pattern: drop the
socket (LINGER=0, so nothing lingers), reconnect and resend, up to `retries` times, then raise
TimeoutError. A resent `infer` may run twice on the server; that is harmless, it has no side effects.
Large arrays travel as extra ZeroMQ frames, which the server reads in place, without a copy.

A periodic model (schedule.trigger: periodic) is not called: the robot publishes observations and
subscribes to the action chunks the server publishes every period.

    pub = ObservationPublisher("tcp://robot-server:5557")
    sub = ActionSubscriber("tcp://robot-server:5556", "pi05_rt")
    pub.publish("pi05_rt", observation)        # as often as the cameras run; the server keeps the newest
    chunk = sub.latest()                        # {model, actions, seq, release_ms, latency_ms}
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import zmq

from .frames import send_frames
from .protocol import OPENPI, decode, encode

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"  # the server's PUB socket (server.publish_bind): action chunks
DEFAULT_OBSERVE = "tcp://127.0.0.1:5557"  # the server's SUB socket (server.observe_bind): observations


class ServerError(Exception):
    """The server answered with an error: `code` (see docs/protocol.md) and a message naming the problem."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PolicyClient:
    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        model: str | None = None,
        timeout_ms: int = 5000,
        retries: int = 2,
        token: str | None = None,
        server_key: str | None = None,
        client_cert: str | None = None,
        encoding: str = OPENPI,
        frames: bool = True,
        context: zmq.Context | None = None,
    ):
        """`model`: the model to address (None: the server's only one). `token`: the admin token, for
        load/unload. `server_key` / `client_cert`: CURVE certificate files (see runtime/security.py).
        `encoding`: how arrays are sent; `frames`: large arrays as zero-copy extra frames (openpi only)."""
        self.endpoint = endpoint
        self.model = model
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.token = token
        self.encoding = encoding
        self.frames = frames and encoding == OPENPI
        self._curve = (server_key, client_cert) if server_key else None
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(random.getrandbits(30))
        self._socket: zmq.Socket | None = None
        self.last_timing: dict | None = None  # the server's timing of the last reply

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.linger = 0  # never block close() or process exit on an unsent request
            if self._curve is not None:
                from .security import client_curve

                client_curve(sock, *self._curve)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def call(self, endpoint: str, data: Any = None, *, model: str | None = None, timeout_ms: int | None = None,
             retries: int | None = None) -> Any:
        """Send one request and return the reply's `data`; raises ServerError or TimeoutError."""
        rid = next(self._ids)
        msg: dict = {"endpoint": endpoint, "id": rid}
        if data is not None:
            msg["data"] = data
        if (model or self.model) is not None:
            msg["model"] = model or self.model
        if self.token is not None:
            msg["token"] = self.token
        arrays: list | None = [] if self.frames else None
        body = encode(msg, self.encoding, arrays)
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        attempts = 1 + (self.retries if retries is None else retries)
        for _ in range(attempts):
            sock = self._connect()
            sock.rcvtimeo = timeout
            # A plain (copying) send: pyzmq's zero-copy send hands each buffer's release to a helper
            # thread, which costs more than copying a few hundred KB. The server reads frames in place.
            send_frames(sock, [body, *(arrays or ())])
            try:
                reply, _ = decode(sock.recv())
            except zmq.Again:
                self.close()  # Lazy Pirate: a REQ socket that missed its reply is unusable; start afresh
                continue
            return self._unwrap(reply, rid, endpoint)
        raise TimeoutError(f"no reply to {endpoint!r} from {self.endpoint} after {attempts} attempt(s) "
                           f"of {timeout} ms")

    def _unwrap(self, reply: Any, rid: int, endpoint: str) -> Any:
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ServerError("bad_reply", f"the reply to {endpoint!r} is not a FlashRT reply: {reply!r:.200}")
        if reply.get("id") not in (rid, None):
            raise ServerError("bad_reply", f"the reply to request {rid} carries id {reply.get('id')!r}")
        self.last_timing = reply.get("timing")
        if not reply["ok"]:
            error = reply.get("error") or {}
            raise ServerError(error.get("code", "error"), error.get("message", "(no message)"))
        return reply.get("data")

    # The endpoints (docs/protocol.md)

    def ping(self, **kw: Any) -> dict:
        return self.call("ping", **kw)

    def metadata(self, **kw: Any) -> dict:
        return self.call("metadata", **kw)

    def models(self, **kw: Any) -> list:
        return self.call("models", **kw)["models"]

    def stats(self, **kw: Any) -> dict:
        return self.call("stats", **kw)

    def infer(self, observation: dict, **kw: Any) -> dict:
        """observation: {images: {camera: uint8 [H, W, 3]}, state: float [D], prompt?: str} -> {actions: ...}"""
        return self.call("infer", observation, **kw)

    def reset(self, **kw: Any) -> dict:
        return self.call("reset", **kw)

    def load(self, config: dict, timeout_ms: int = 600_000, **kw: Any) -> dict:
        """Admin: load (or swap in) a model from a `models:` entry mapping. Not retried: loads are slow."""
        return self.call("load", {"config": config}, timeout_ms=timeout_ms, retries=0, **kw)

    def unload(self, name: str, **kw: Any) -> dict:
        return self.call("unload", model=name, retries=0, **kw)


# ---------------------------------------------------------------------------------------------
# Periodic models: observations out, action chunks in (docs/protocol.md, "Periodic streams")


def _socket(kind: int, endpoint: str, context: zmq.Context | None, server_key: str | None,
            client_cert: str | None) -> zmq.Socket:
    sock = (context or zmq.Context.instance()).socket(kind)
    sock.linger = 0
    if server_key:
        from .security import client_curve

        client_curve(sock, server_key, client_cert)
    return sock


class _StreamSocket:
    """One stream socket, closed without lingering; usable as a context manager."""

    _socket: zmq.Socket

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ObservationPublisher(_StreamSocket):
    """Publishes observations to the server's SUB socket; the server keeps only each model's newest.

    A PUB socket drops what it cannot send instead of blocking: with no server connected (or for the
    first few milliseconds after connecting, ZeroMQ's slow joiner) observations are lost, which is
    what a control loop wants; it publishes again at its next frame."""

    def __init__(self, endpoint: str = DEFAULT_OBSERVE, encoding: str = OPENPI, frames: bool = True,
                 server_key: str | None = None, client_cert: str | None = None, context: zmq.Context | None = None):
        self.encoding = encoding
        self.frames = frames and encoding == OPENPI
        self._socket = _socket(zmq.PUB, endpoint, context, server_key, client_cert)
        # At most a few wait for a slow link; newer ones are dropped until it drains, so what reaches
        # the server is never more than a few frames old (a long queue would deliver ever staler ones).
        self._socket.sndhwm = 4
        self._socket.connect(endpoint)

    def publish(self, model: str, observation: dict) -> None:
        """observation: {images: {camera: uint8 [H, W, 3]}, state, prompt?}, as for `infer`."""
        arrays: list | None = [] if self.frames else None
        body = encode(observation, self.encoding, arrays)
        send_frames(self._socket, [model.encode(), body, *(arrays or ())])  # copied, as PolicyClient.call



class ActionSubscriber(_StreamSocket):
    """Receives the action chunks of periodic models from the server's PUB socket.

    Each message is `{model, actions, seq, release_ms, latency_ms}`: `seq` numbers the model's
    releases (a gap means releases were skipped or refused), `release_ms` is the release time (unix
    milliseconds), `latency_ms` release to result. A release that produced no actions (its
    observation did not fit the model, or it was refused by admission control) arrives as an error,
    raised as ServerError."""

    def __init__(self, endpoint: str = DEFAULT_PUBLISH, models: str | list[str] | None = None,
                 timeout_ms: int = 1000, server_key: str | None = None, client_cert: str | None = None,
                 context: zmq.Context | None = None):
        """`models`: the model name(s) to receive (None: all)."""
        self.timeout_ms = timeout_ms
        self.models = None if models is None else {models} if isinstance(models, str) else set(models)
        self._socket = _socket(zmq.SUB, endpoint, context, server_key, client_cert)
        for topic in self.models or [""]:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(endpoint)

    def _next(self, timeout_ms: int) -> dict | None:
        """The next message of a wanted model, or None when none arrives in time."""
        while self._socket.poll(timeout_ms):
            frames = self._socket.recv_multipart()
            model = frames[0].decode("utf-8", "replace")
            if self.models is not None and model not in self.models:  # topics match by prefix: "cam" gets "cam2"
                continue
            msg, _ = decode(frames[1])
            msg["model"] = model
            return msg
        return None

    @staticmethod
    def _unwrap(msg: dict) -> dict:
        if "error" in msg:
            err = msg["error"]
            raise ServerError(err.get("code", "error"), f"{msg['model']} release {msg.get('seq')}: "
                                                        f"{err.get('message', '(no message)')}")
        return msg

    def recv(self, timeout_ms: int | None = None) -> dict:
        """The next action chunk, in order. TimeoutError when none arrives within the timeout."""
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        msg = self._next(timeout)
        if msg is None:
            raise TimeoutError(f"no action chunk within {timeout} ms")
        return self._unwrap(msg)

    def latest(self, timeout_ms: int | None = None) -> dict:
        """The newest action chunk queued (older ones are dropped); waits for one if none is."""
        msg = self._next(self.timeout_ms if timeout_ms is None else timeout_ms)
        if msg is None:
            raise TimeoutError(f"no action chunk within {self.timeout_ms if timeout_ms is None else timeout_ms} ms")
        while (newer := self._next(0)) is not None:
            msg = newer
        return self._unwrap(msg)

