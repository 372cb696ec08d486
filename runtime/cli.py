"""Command line: `flashrt-serve --config FILE` and `flashrt-client` (a synthetic-observation client).

The client part imports only pyzmq, msgpack, numpy and runtime.client/protocol/observation, so it
runs on a robot computer (or a healthcheck) without torch; the server's imports stay in serve_main.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .client import PolicyClient, ServerError
from .observation import synthetic_observation
from .protocol import ENCODINGS, OPENPI


def serve_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashrt-serve", description="Serve the models of a deployment config "
                                     "over ZeroMQ. SIGHUP reloads the config; SIGTERM/SIGINT stop cleanly.")
    parser.add_argument("--config", required=True, help="deployment YAML (server: and models:)")
    parser.add_argument("--bind", action="append", metavar="ENDPOINT",
                        help="bind this endpoint instead of server.bind (repeatable), e.g. tcp://0.0.0.0:5555")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)

    import logging
    import signal

    from flashrt.errors import FlashRTError

    from .config import load_deployment
    from .server import Server, admin_token_from_env

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_deployment(args.config)
        if args.bind:
            config.server.bind = args.bind
            config.server.validate("--bind")
        server = Server(config, admin_token=admin_token_from_env())
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        signal.signal(signal.SIGINT, lambda *_: server.stop())
        signal.signal(signal.SIGHUP, lambda *_: server.reload())
        server.serve_forever()
    except (FlashRTError, OSError, ValueError) as e:
        print(f"flashrt-serve: {e}", file=sys.stderr)
        return 1
    return 0


def client_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashrt-client", description="Send synthetic observations to a FlashRT "
                                     "server and print the action chunk's shape and the latency.")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument("--model", help="model name (default: the server's only model)")
    parser.add_argument("-n", type=int, default=5, help="number of inferences (default 5)")
    parser.add_argument("--timeout-ms", type=int, default=5000)
    parser.add_argument("--ping", action="store_true", help="only ping: exit 0 if the server answers")
    parser.add_argument("--prompt", help="task text (default: the model's default prompt)")
    parser.add_argument("--encoding", default=OPENPI, choices=ENCODINGS, help="array encoding on the wire")
    parser.add_argument("--server-key", help="CURVE: the server's public certificate file")
    parser.add_argument("--client-cert", help="CURVE: this client's secret certificate file")
    args = parser.parse_args(argv)

    client = PolicyClient(args.endpoint, model=args.model, timeout_ms=args.timeout_ms, retries=0 if args.ping else 2,
                          server_key=args.server_key, client_cert=args.client_cert, encoding=args.encoding)
    try:
        if args.ping:
            reply = client.ping()
            print(f"ok: {args.endpoint} serves {', '.join(reply['models']) or 'no models'}")
            return 0
        meta = client.metadata()
        obs = synthetic_observation(meta["spec"])
        if args.prompt:
            obs["prompt"] = args.prompt
        print(f"model {meta['model']!r} ({meta['spec'].get('kind')}, generation {meta['generation']}): "
              f"cameras {list(obs['images'])}, state [{meta['spec']['state_dim']}]")
        latencies = []
        for i in range(args.n):
            t0 = time.perf_counter()
            actions = np.asarray(client.infer(obs)["actions"])
            latencies.append((time.perf_counter() - t0) * 1e3)
            t = client.last_timing or {}
            print(f"[{i}] actions {list(actions.shape)} {actions.dtype}  round trip {latencies[-1]:.2f} ms "
                  f"(server {t.get('server_ms', float('nan')):.2f} ms, model {t.get('infer_ms', float('nan')):.2f} ms)")
        if latencies:
            print(f"round trip over {len(latencies)}: p50 {np.percentile(latencies, 50):.2f} ms, "
                  f"max {max(latencies):.2f} ms")
        return 0
    except (ServerError, TimeoutError, OSError, KeyError) as e:
        print(f"flashrt-client: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
