"""Periodic models' streams: observations in on a SUB socket, action chunks out on a PUB socket.

A robot publishes `[model name, msgpack observation, *extra frames]` to the server's SUB socket
(`server.observe_bind`) and subscribes to the server's PUB socket (`server.publish_bind`), where each
periodic result arrives as `[model name, msgpack {actions, seq, release_ms, latency_ms}]`. Both
sockets belong to the I/O thread and are bound only once a periodic model is served.

Only the newest observation per model matters. Whenever the SUB socket is readable the I/O thread
reads everything queued (up to a bound, so a flood cannot starve requests) and decodes only each
model's last message; the rest are counted as superseded, never decoded. ZMQ_CONFLATE would keep one
message, but it refuses multipart messages and would keep one for all models together. The receive
queue is kept short (RCVHWM) so a stalled server holds a few observations, not gigabytes of images.
"""

from __future__ import annotations

from collections import Counter

import zmq

from .config import ServerConfig
from .frames import recv_frames, send_frames
from .security import curve_server_keys

RCVHWM = 16  # observations queued in the SUB socket; drained whenever readable
SNDHWM = 64  # action chunks queued per subscriber; a subscriber that stops reading loses the oldest new ones
DRAIN_LIMIT = 1000  # messages read per wake-up before the I/O thread looks at requests again


class Streams:
    def __init__(self, ctx: zmq.Context, config: ServerConfig):
        self._ctx = ctx
        self._config = config
        self.sub: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.publish_endpoint: str | None = None
        self.observe_endpoint: str | None = None
        self.received = 0
        self.superseded = 0
        self.published = 0
        self.invalid: Counter[str] = Counter()

    @property
    def bound(self) -> bool:
        return self.sub is not None

    def bind(self) -> None:
        """Bind both sockets (once). Raises OSError naming the endpoint that could not be bound."""
        if self.bound:
            return
        cfg = self._config
        pub = self._ctx.socket(zmq.PUB)
        sub = self._ctx.socket(zmq.SUB)
        try:
            pub.sndhwm = SNDHWM
            sub.rcvhwm = RCVHWM
            sub.maxmsgsize = 2 * cfg.max_message_bytes + (1 << 20)  # as the request socket: far over, dropped
            sub.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: unknown ones are counted, not silently ignored
            if cfg.curve is not None:
                curve_server_keys(pub, cfg.curve.secret_key)
                curve_server_keys(sub, cfg.curve.secret_key)
            for sock, key, endpoint in ((pub, "publish_bind", cfg.publish_bind), (sub, "observe_bind", cfg.observe_bind)):
                try:
                    sock.bind(endpoint)
                except zmq.ZMQError as e:
                    raise OSError(f"cannot bind server.{key} {endpoint}: {e}") from None
        except BaseException:
            pub.close(linger=0)
            sub.close(linger=0)
            raise
        self.pub, self.sub = pub, sub
        self.publish_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.observe_endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)

    def drain(self) -> dict[bytes, list]:
        """The newest queued message (its frames) of each topic."""
        newest: dict[bytes, list] = {}
        for _ in range(DRAIN_LIMIT):
            try:
                frames = recv_frames(self.sub, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.received += 1
            topic = frames[0].bytes
            if topic in newest:
                self.superseded += 1
            newest[topic] = frames
        return newest

    def publish(self, frames: list) -> None:
        send_frames(self.pub, frames)  # PUB never blocks: a slow subscriber loses messages instead
        self.published += 1

    def snapshot(self) -> dict:
        return {"publish": self.publish_endpoint, "observe": self.observe_endpoint, "received": self.received,
                "superseded": self.superseded, "invalid": dict(self.invalid), "published": self.published}

    def close(self) -> None:
        for sock in (self.pub, self.sub):
            if sock is not None:
                sock.close(linger=1000 if sock is self.pub else 0)
