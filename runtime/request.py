"""One request in flight on the server: where to send the reply, what was asked, when it arrived."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flashrt.errors import FlashRTError

from .protocol import DEADLINE, INTERNAL, OPENPI, UNAVAILABLE, ProtocolError, encode
from .scheduler import Cancelled, Rejected

log = logging.getLogger("flashrt.runtime")

@dataclass(slots=True, eq=False)
class Request:
    route: list[bytes]  # ZeroMQ routing frames: the peer's identity (+ the empty delimiter of a REQ peer)
    t_recv: float  # perf_counter() when the message was received
    id: Any = None
    endpoint: str = ""
    model: str | None = None
    data: Any = None
    encoding: str = OPENPI  # reply arrays in the encoding the request used
    bare: bool = False  # Isaac-GR00T get_action: the reply is the payload itself, without the envelope
    t_ready: float = 0.0  # decoded, validated and handed to the model's executor

    def reply(self, payload: Any, timing: dict) -> list:
        if self.bare:
            return self.route + [encode(payload, self.encoding)]
        body = {"ok": True, "data": payload, "timing": timing}
        if self.id is not None:
            body["id"] = self.id
        return self.route + [encode(body, self.encoding)]

    def error(self, code: str, message: str, timing: dict | None = None) -> list:
        body: dict = {"ok": False, "error": {"code": code, "message": message}}
        if self.id is not None:
            body["id"] = self.id
        if timing is not None:
            body["timing"] = timing
        return self.route + [encode(body)]


def error_of(e: BaseException, quiet: bool = False) -> tuple[str, str]:
    """(code, message) for an exception raised while serving: expected failures keep their code.
    An unexpected one is logged with its traceback, unless `quiet` (the caller rate-limits its logs)."""
    if isinstance(e, ProtocolError):
        return e.code, e.message
    if isinstance(e, FlashRTError):
        return e.code, str(e)
    if isinstance(e, Rejected):  # admission control, with the scheduler's estimate in the message
        return DEADLINE, str(e)
    if isinstance(e, Cancelled):
        return UNAVAILABLE, str(e)
    if not quiet:
        log.error("unexpected failure", exc_info=e)
    return INTERNAL, f"{type(e).__name__}: {e}"
