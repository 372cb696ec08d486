"""The policy server: a ZeroMQ ROUTER socket, one I/O thread, and one scheduler thread that owns the GPU.

The I/O thread owns the sockets and the table of served models. It decodes each request, answers
the cheap endpoints itself, validates observations, and has the model's executor stage the inputs
and submit the GPU work to the scheduler, which interleaves all models' segments by priority and
deadline (runtime/scheduler.py). A finished task comes back through the mailbox, and the I/O thread
encodes and sends the reply: one hand-over each way per request. Periodic models get their
observations from a SUB socket and publish their actions on a PUB socket (runtime/streams.py).
Loading runs on a background thread and hands the warm model to the I/O thread to install, so a
swap never blocks serving and never drops a request. Any failure becomes an error reply.
"""

from __future__ import annotations

import gc
import hmac
import itertools
import logging
import os
import threading
import time
from functools import partial
from time import perf_counter
from typing import Any, Callable

import zmq

from .config import DeploymentConfig, ServedModelConfig, load_deployment, parse_model
from .executor import RESET, Infer, ModelExecutor, Observed, QuietLog
from .mailbox import Mailbox
from .models import LoadedModel, Loader, flashrt_loader, load_model
from .observation import describe_io, groot_observation, groot_reply, observation
from .protocol import (BAD_INPUT, BAD_REQUEST, BUSY, OPENPI, TOO_LARGE, UNAUTHORIZED, UNAVAILABLE,
                       UNKNOWN_ENDPOINT, UNKNOWN_MODEL, VERSION, ProtocolError, decode, parse_envelope)
from .frames import recv_frames, send_frames
from .request import Request, error_of
from .scheduler import CudaDevice, ModelTally, Scheduler, SyncDevice
from .security import server_curve
from .stats import ModelStats
from .streams import Streams

log = logging.getLogger("flashrt.runtime")

ADMIN_ENDPOINTS = ("load", "unload")
POLL_MS = 100  # how often the I/O loop looks at stop/reload flags when no message arrives


def _split_route(frames: list) -> tuple[list[bytes], Any, list]:
    """(routing frames, body, extra frames). ROUTER prepends the peer's identity; a REQ peer (or a
    DEALER imitating one) puts an empty delimiter frame before the body."""
    n = 2 if len(frames) >= 3 and len(frames[1]) == 0 else 1
    return [f.bytes for f in frames[:n]], frames[n], frames[n + 1:]


def _settle_heap() -> None:
    """Put every object alive now (the models, torch, numpy, the modules) out of the garbage
    collector's reach. A full collection walks every tracked object: in a serving process, ~180k of
    them and ~90 ms on a 2-core VM, all of it holding the GIL, so the scheduler thread would release
    the real-time model that much late whenever Python decided to collect. Frozen, they are never
    walked again, and a collection covers only what serving allocates (~0.01 ms). Called when
    serving starts and once a swapped-out or unloaded model is let go: there one full collection
    runs first, so that model's reference cycles (and their GPU memory) are freed; that one pause
    is the price of a swap."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _groot_reply(mapping: Any, result: dict) -> list:
    return groot_reply(result["actions"], mapping)


def _device_for(models: list[LoadedModel]) -> Any:
    """CUDA streams and events when a model runs on a GPU, else segments run as they are launched."""
    for m in models:
        if str(m.spec.get("device", "cpu")).startswith("cuda"):
            import torch

            return CudaDevice(torch.device(m.spec["device"]))
    return SyncDevice()


class Server:
    def __init__(self, config: DeploymentConfig, loader: Loader = flashrt_loader, admin_token: str | None = None):
        self.config = config
        self._loader = loader
        self._admin_token = admin_token or config.server.admin_token
        self._ctx = zmq.Context()
        self._mailbox = Mailbox()  # other threads hand the I/O thread work through it
        # Owned by the I/O thread once serving.
        self._executors: dict[str, ModelExecutor] = {}
        self._retired: list[ModelExecutor] = []  # swapped out or unloaded, finishing their queues
        self._stats: dict[str, ModelStats] = {}
        self._load_lock = threading.Lock()  # one load at a time: two captures would compete for the GPU
        self._reload_lock = threading.Lock()  # one config reload at a time (SIGHUPs may come in quick succession)
        self._generations = itertools.count(1)
        self._stop_requested = False
        self._reload_requested = False
        self._started_at = time.time()
        self._requests = 0
        self._rejected: dict[str, int] = {}  # error replies sent by the I/O thread itself, by code
        self._thread: threading.Thread | None = None
        self._authenticator = None
        self._scheduler: Scheduler | None = None
        self._scheduler_stop = threading.Event()
        self._scheduler_thread: threading.Thread | None = None
        self._streams = Streams(self._ctx, config.server)
        self._poller: zmq.Poller | None = None
        self._quiet = QuietLog()
        self.bound: list[str] = []  # the endpoints actually bound (a `*` port resolved)
        self._handlers: dict[str, Callable[[Request], None]] = {
            "ping": self._ping, "metadata": self._metadata, "models": self._models, "stats": self._stats_endpoint,
            "infer": self._infer, "get_action": self._infer, "reset": self._reset,
            "load": self._load_endpoint, "unload": self._unload_endpoint,
        }

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> "Server":
        """Load every model, bind, and serve on a background thread. Returns once serving."""
        self._open()
        self._thread = threading.Thread(target=self._loop, name="flashrt-io", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Load every model, bind, and serve on this thread until stop() (e.g. from a signal handler)."""
        self._open()
        self._loop()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let queued ones finish, close. Safe from any thread or a signal handler."""
        self._stop_requested = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def reload(self) -> None:
        """Re-read the config file and load what changed (SIGHUP). Safe from a signal handler."""
        self._reload_requested = True

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def streams(self) -> dict[str, str | None]:
        """The periodic streams' endpoints as bound (None until a periodic model is served)."""
        return {"publish": self._streams.publish_endpoint, "observe": self._streams.observe_endpoint}

    def _open(self) -> None:
        """Bind first (a taken port fails fast), then load every model; clients that connect meanwhile
        wait in the socket's queue, so a ping answered means every model is warm."""
        self._router = self._ctx.socket(zmq.ROUTER)
        # A hard cap far above the polite limit: a peer sending more is disconnected by libzmq
        # instead of making the server hold gigabytes; up to it, the peer gets a too_large reply.
        self._router.maxmsgsize = 2 * self.config.server.max_message_bytes + (1 << 20)
        try:
            curve = self.config.server.curve
            if curve is not None:
                self._authenticator = server_curve(self._ctx, self._router, curve.secret_key, curve.clients)
            for endpoint in self.config.server.binds:
                try:
                    self._router.bind(endpoint)
                except zmq.ZMQError as e:
                    raise OSError(f"cannot bind {endpoint}: {e}") from None
                self.bound.append(self._router.getsockopt_string(zmq.LAST_ENDPOINT))
            if any(cfg.schedule.periodic for cfg in self.config.models):
                self._streams.bind()
            loaded = [self._build(cfg) for cfg in self.config.models]
            self._start_scheduler(loaded)
            for model in loaded:
                self._install(model, None)
        except BaseException:
            for name in list(self._executors):
                self._retire(name)
            self._close()
            raise
        _settle_heap()
        streams = f"; periodic streams: actions on {self._streams.publish_endpoint}, observations on " \
                  f"{self._streams.observe_endpoint}" if self._streams.bound else ""
        log.info("serving %s on %s%s", ", ".join(self._executors), ", ".join(self.bound), streams)

    def _start_scheduler(self, models: list[LoadedModel]) -> None:
        """One scheduler thread launches every model's GPU work (the device follows the models)."""
        server = self.config.server
        self._scheduler = Scheduler(_device_for(models), depth=server.scheduler_depth, window=server.stats_window)
        self._scheduler_thread = threading.Thread(target=self._scheduler.run, args=(self._scheduler_stop,),
                                                  name="flashrt-scheduler", daemon=True)
        self._scheduler_thread.start()

    def _stop_scheduler(self) -> None:
        if self._scheduler_thread is None:
            return
        self._scheduler_stop.set()
        self._scheduler.wake()
        self._scheduler_thread.join(10.0)
        if not self._scheduler_thread.is_alive():
            self._scheduler.cancel_pending("the server is shutting down")  # whoever waits gets an answer

    def _close(self) -> None:
        self._stop_scheduler()
        self._mailbox.run()  # the tasks the scheduler cancelled: their clients get an answer
        self._router.close(linger=1000)  # replies already queued still go out
        self._streams.close()
        if self._authenticator is not None:
            self._authenticator.stop()
        if self._scheduler_thread is not None and self._scheduler_thread.is_alive():
            # A model call that never returns must not keep the process alive; it may still post.
            log.warning("the scheduler is still running a model call; closing without waiting for it")
        else:
            self._mailbox.close()
        self._ctx.term()

    # ------------------------------------------------------------------------------------------
    # The I/O loop

    def _loop(self) -> None:
        poller = self._poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._mailbox.fileno(), zmq.POLLIN)
        if self._streams.bound:
            poller.register(self._streams.sub, zmq.POLLIN)
        deadline = None
        self._mailbox.owner = threading.get_ident()  # its posts from this thread are found without a wake-up
        while True:
            # Calls this thread posted (a request whose work ran at once, see Scheduler.submit) run
            # before the next poll blocks.
            events = dict(poller.poll(0 if not self._mailbox.empty() else POLL_MS))
            if self._router in events:
                self._on_request(recv_frames(self._router))
            # The poller reports a plain descriptor by its number.
            woken = self._mailbox.fileno() in events
            if woken or not self._mailbox.empty():
                self._mailbox.run(woken)
            if self._streams.sub is not None and self._streams.sub in events:
                self._on_observations()
            if self._retired:  # a swapped-out model goes (its memory with it) once its last request is answered
                alive = [ex for ex in self._retired if not ex.done()]
                if len(alive) < len(self._retired):
                    self._retired = alive
                    _settle_heap()
            if self._reload_requested:
                self._reload_requested = False
                threading.Thread(target=self._reload, name="flashrt-reload", daemon=True).start()
            if self._stop_requested:
                if deadline is None:  # stop taking work; every queued request still gets its reply
                    deadline = time.monotonic() + 10.0
                    for name in list(self._executors):
                        self._retire(name)
                if (all(ex.done() for ex in self._retired) and self._mailbox.empty()) or time.monotonic() > deadline:
                    break
        self._close()
        log.info("stopped")

    def _on_request(self, frames: list) -> None:
        t_recv = perf_counter()
        route, body, extra = _split_route(frames)
        req = Request(route=route, t_recv=t_recv)
        self._requests += 1
        try:
            size = sum(map(len, frames[len(route):]))
            limit = self.config.server.max_message_bytes
            if size > limit:
                raise ProtocolError(TOO_LARGE, f"message of {size} bytes is over this server's limit of {limit} "
                                               "bytes (server.max_message_bytes); it was not decoded")
            msg, encoding = decode(body.buffer, [f.buffer for f in extra])
            req.encoding = encoding or OPENPI
            req.endpoint, req.data, req.model, req.id, token = parse_envelope(msg)
            handler = self._handlers.get(req.endpoint)
            if handler is None:
                raise ProtocolError(UNKNOWN_ENDPOINT, f"unknown endpoint {req.endpoint!r} "
                                                      f"(endpoints: {', '.join(self._handlers)})")
            if self._stop_requested:
                raise ProtocolError(UNAVAILABLE, "the server is shutting down")
            if req.endpoint in ADMIN_ENDPOINTS:
                self._authorize(req.endpoint, token)
            handler(req)
        except Exception as e:  # whatever happens, the client gets an answer and the loop goes on
            code, message = error_of(e)
            self._send_error(req, code, message)

    def _on_observations(self) -> None:
        """Each periodic model's newest observation, decoded and handed to the scheduler; a bad one is
        counted and logged (a robot's stream must not be able to stop anything)."""
        for topic, frames in self._streams.drain().items():
            name = topic.decode("utf-8", "replace")
            try:
                ex = self._executors.get(name)
                if ex is None or not ex.schedule.periodic:
                    periodic = [n for n, e in self._executors.items() if e.schedule.periodic]
                    raise ProtocolError(UNKNOWN_MODEL, f"observation published for {name!r}, which is not a periodic "
                                                       f"model here (periodic: {', '.join(periodic) or 'none'})")
                if len(frames) < 2:
                    raise ProtocolError(BAD_REQUEST, "an observation is [model name, msgpack observation, "
                                                     "*extra frames]; this message has no body")
                size, limit = sum(len(f) for f in frames[1:]), self.config.server.max_message_bytes
                if size > limit:
                    raise ProtocolError(TOO_LARGE, f"observation of {size} bytes is over the limit of {limit} bytes")
                msg, encoding = decode(frames[1].buffer, [f.buffer for f in frames[2:]])
                self._scheduler.publish(name, Observed(observation(msg), encoding or OPENPI))
            except Exception as e:
                code, message = error_of(e)
                self._streams.invalid[code] += 1
                self._quiet(f"published observation refused, {code}: {message}")

    def _send(self, req: Request, payload: Any) -> None:
        send_frames(self._router, req.reply(payload, {"server_ms": (perf_counter() - req.t_recv) * 1e3}))

    def _send_error(self, req: Request, code: str, message: str) -> None:
        self._rejected[code] = self._rejected.get(code, 0) + 1
        send_frames(self._router, req.error(code, message, {"server_ms": (perf_counter() - req.t_recv) * 1e3}))

    # ------------------------------------------------------------------------------------------
    # Endpoints (on the I/O thread)

    def _executor(self, req: Request) -> ModelExecutor:
        if req.model is None:
            if len(self._executors) == 1:
                return next(iter(self._executors.values()))
            raise ProtocolError(UNKNOWN_MODEL, "no model is loaded" if not self._executors else
                                f"this server serves {len(self._executors)} models ({', '.join(self._executors)}); "
                                "name one with 'model'")
        ex = self._executors.get(req.model)
        if ex is None:
            raise ProtocolError(UNKNOWN_MODEL, f"unknown model {req.model!r} (serving: {', '.join(self._executors) or 'none'})")
        return ex

    def _authorize(self, endpoint: str, token: str | None) -> None:
        if self._admin_token is None:
            raise ProtocolError(UNAUTHORIZED, f"{endpoint!r} is disabled: this server has no admin token "
                                              "(server.admin_token or FLASHRT_ADMIN_TOKEN)")
        if token is None or not hmac.compare_digest(token.encode(), self._admin_token.encode()):
            raise ProtocolError(UNAUTHORIZED, f"{endpoint!r} needs the server's admin token ('token' in the request)")

    def _ping(self, req: Request) -> None:
        self._send(req, {"status": "ok", "message": "Server is running", "protocol": VERSION,
                         "models": list(self._executors)})

    def _schedule(self, model: LoadedModel) -> dict:
        """A model's schedule as `metadata` and `models` show it, with its streams when periodic."""
        out = model.config.schedule.describe()
        if model.config.schedule.periodic:
            out["streams"] = {"topic": model.config.name, **self.streams}
        return out

    def _metadata(self, req: Request) -> None:
        model = self._executor(req).model
        self._send(req, {"model": model.config.name, "generation": model.generation, "spec": model.spec,
                         **describe_io(model.spec), "groot": model.config.groot is not None,
                         "schedule": self._schedule(model)})

    def _models(self, req: Request) -> None:
        self._send(req, {"models": [
            {"name": name, "kind": ex.model.spec.get("kind"), "generation": ex.model.generation,
             "loaded_at": ex.model.loaded_at, "load_s": ex.model.load_s, "queue": ex.depth,
             "checkpoint": ex.model.config.checkpoint, "schedule": self._schedule(ex.model)}
            for name, ex in self._executors.items()]})

    def _stats_endpoint(self, req: Request) -> None:
        models = {}
        for name, ex in self._executors.items():
            tally = (self._scheduler.tally.get(name) or ModelTally()).as_dict()
            tally.pop("errors")  # failed launches: already among the error replies counted in `errors`
            models[name] = {**ex.stats.snapshot(), **tally, "queue": ex.depth, "generation": ex.model.generation}
        out = {"uptime_s": time.time() - self._started_at, "requests": self._requests,
               "rejected": dict(self._rejected), "retiring": len(self._retired), "models": models}
        if self._streams.bound:
            out["streams"] = self._streams.snapshot()
        self._send(req, out)

    def _infer(self, req: Request) -> None:
        ex = self._executor(req)
        model = ex.model
        try:
            if model.config.schedule.periodic:
                raise ProtocolError(BAD_REQUEST, f"model {model.config.name!r} runs periodically (schedule.trigger: "
                                                 f"periodic): publish its observations to {self.streams['observe']} "
                                                 f"with topic {model.config.name!r} and subscribe to "
                                                 f"{self.streams['publish']} for its actions")
            if isinstance(req.data, dict) and "observation" in req.data:  # an Isaac-GR00T client
                if model.config.groot is None:
                    raise ProtocolError(BAD_INPUT, f"model {model.config.name!r} has no `groot:` key mapping in "
                                                   "its config, so it cannot serve an Isaac-GR00T observation")
                obs = groot_observation(req.data["observation"], model.config.groot, model.required_cameras)
                req.bare = True
                work = Infer(obs, partial(_groot_reply, model.config.groot))
            else:
                work = Infer(observation(req.data))
        except ProtocolError as e:
            ex.stats.record_error(e.code)
            raise
        self._submit(ex, req, work)

    def _reset(self, req: Request) -> None:
        self._submit(self._executor(req), req, RESET)

    def _submit(self, ex: ModelExecutor, req: Request, work: Infer | str) -> None:
        req.t_ready = perf_counter()
        if not ex.submit(req, work):
            ex.stats.record_error(BUSY)
            raise ProtocolError(BUSY, f"model {ex.model.config.name!r} already has {ex.depth} requests waiting "
                                      "(server.max_queue); try again later")

    def _load_endpoint(self, req: Request) -> None:
        data = req.data
        if not isinstance(data, dict) or set(data) != {"config"}:
            raise ProtocolError(BAD_INPUT, "load: data must be {config: <a model config mapping, as in a "
                                           "models: entry of the deployment config>}")
        cfg = parse_model(data["config"], "load: config")  # ConfigError -> bad_config, before any work
        threading.Thread(target=self._load_and_install, args=(cfg, req), name=f"load-{cfg.name}", daemon=True).start()

    def _unload_endpoint(self, req: Request) -> None:
        if req.model is None:
            raise ProtocolError(BAD_INPUT, "unload: name the model with 'model'")
        self._executor(req)  # unknown_model if it is not served
        self._retire(req.model)
        self._forget(req.model)
        self._send(req, {"model": req.model, "unloaded": True})

    # ------------------------------------------------------------------------------------------
    # Loading and swapping

    def _build(self, cfg: ServedModelConfig) -> LoadedModel:
        """Load and warm a model (any thread; slow)."""
        model = load_model(cfg, self._loader)
        model.generation = next(self._generations)  # loads are serialized, so generations follow install order
        return model

    def _install(self, model: LoadedModel, req: Request | None) -> None:
        """Switch a model's name to `model` (I/O thread). The old executor finishes its queue, and the
        tasks it has in the scheduler, on the old model."""
        name = model.config.name
        old = self._executors.get(name)
        if self._stop_requested:
            if req is not None:
                self._send_error(req, UNAVAILABLE, "the server is shutting down")
            return
        schedule = model.config.schedule
        if schedule.periodic and not self._streams.bound:
            try:
                self._streams.bind()
            except OSError as e:
                text = f"loading model {name!r} failed, {'the running one keeps serving' if old else 'nothing was loaded'}: {e}"
                if req is None:
                    raise OSError(text) from None
                log.error("%s", text)
                self._send_error(req, "bad_config", text)
                return
            if self._poller is not None:
                self._poller.register(self._streams.sub, zmq.POLLIN)
        if str(model.spec.get("device", "cpu")).startswith("cuda") and isinstance(self._scheduler.device, SyncDevice):
            log.warning("model %r runs on %s but this server's scheduler started without a GPU model: its segments "
                        "are launched in order on the default stream and its latencies are not measured on the GPU",
                        name, model.spec["device"])
        stats = self._stats.setdefault(name, ModelStats(self.config.server.stats_window))
        ex = ModelExecutor(model, stats, self._scheduler, self._mailbox, partial(send_frames, self._router),
                           self._streams.publish, self.config.server.max_queue)
        self._executors[name] = ex
        if schedule.periodic:  # a swap keeps the stream's phase and newest observation
            self._scheduler.add_periodic(name, schedule.period_ms / 1e3, ex.release)
        elif old is not None and old.schedule.periodic:
            self._scheduler.remove_periodic(name)
        if old is not None:
            old.close()
            self._retired.append(old)
        log.info("model %r generation %d serving (loaded in %.2f s%s)", name, ex.model.generation, ex.model.load_s,
                 f", replacing generation {old.model.generation}" if old else "")
        if req is not None:
            self._send(req, {"model": name, "generation": ex.model.generation, "load_s": ex.model.load_s,
                             "replaced": None if old is None else old.model.generation})

    def _retire(self, name: str) -> None:
        ex = self._executors.pop(name)
        if ex.schedule.periodic:
            self._scheduler.remove_periodic(name)
        ex.close()
        self._retired.append(ex)

    def _forget(self, name: str) -> None:
        """An unloaded model's counters go with it (a later model of that name starts afresh)."""
        self._stats.pop(name, None)
        self._scheduler.tally.pop(name, None)

    def _load_and_install(self, cfg: ServedModelConfig, req: Request | None) -> bool:
        """Load beside the serving model, then hand over to the I/O thread; a failure changes nothing."""
        with self._load_lock:
            try:
                model = self._build(cfg)
            except Exception as e:
                code, message = error_of(e)
                serving = cfg.name in self._executors
                text = (f"loading model {cfg.name!r} failed, "
                        f"{'the running one keeps serving' if serving else 'nothing was loaded'}: {message}")
                log.error("%s", text)
                if req is not None:
                    self._mailbox.post(partial(self._send_error, req, code, text))
                return False
            self._mailbox.post(partial(self._install, model, req))
            return True

    def _reload(self) -> None:
        """SIGHUP: load new or changed models from the config file, unload removed ones."""
        with self._reload_lock:
            self._reload_once()

    def _reload_once(self) -> None:
        path = self.config.path
        if path is None:
            log.error("reload: this server was not started from a config file")
            return
        try:
            new = load_deployment(path)
        except Exception as e:
            log.error("reload: %s; nothing changed", e)
            return
        if new.server != self.config.server:
            log.warning("reload: the server section changed; restart the server to apply it")
        serving = {name: ex.model.config for name, ex in dict(self._executors).items()}
        for cfg in new.models:
            if serving.get(cfg.name) != cfg:
                log.info("reload: loading model %r", cfg.name)
                self._load_and_install(cfg, None)
        for name in set(serving) - {cfg.name for cfg in new.models}:
            log.info("reload: unloading model %r", name)
            self._mailbox.post(partial(self._unload_quietly, name))

    def _unload_quietly(self, name: str) -> None:
        if name in self._executors:
            self._retire(name)
            self._forget(name)


def admin_token_from_env() -> str | None:
    """FLASHRT_ADMIN_TOKEN, held to the same rule as server.admin_token; empty means unset."""
    token = os.environ.get("FLASHRT_ADMIN_TOKEN") or None
    if token is not None and len(token) < 8:
        raise ValueError("FLASHRT_ADMIN_TOKEN: expected a string of at least 8 characters")
    return token
