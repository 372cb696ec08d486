"""CURVE encryption and client authentication (ZeroMQ's Ironhouse pattern), for both ends.

Keys are ZeroMQ certificate files as written by `zmq.auth.create_certificates(folder, name)`:
`name.key` holds the public key, `name.key_secret` both keys.
"""

from __future__ import annotations

import os

import zmq
import zmq.auth


def _load(path: str, need_secret: bool, what: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no certificate file at {path}")
    public, secret = zmq.auth.load_certificate(path)
    if need_secret and secret is None:
        raise ValueError(f"{what}: {path} holds no secret key (use the NAME.key_secret file)")
    return public, secret


def _need_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support")


def server_curve(ctx: zmq.Context, sock: zmq.Socket, secret_key: str, clients: str | None):
    """Make `sock` a CURVE server (before it binds). Returns the authenticator to stop later, if any."""
    _need_curve()
    _load(secret_key, True, "server.curve.secret_key")  # a missing or public-only file fails before anything starts
    authenticator = None
    if clients is not None:
        if not os.path.isdir(clients):
            raise FileNotFoundError(f"server.curve.clients: no folder at {clients}")
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(ctx)
        authenticator.start()
        authenticator.configure_curve(domain="*", location=clients)  # only these public keys connect
    curve_server_keys(sock, secret_key)
    return authenticator


def curve_server_keys(sock: zmq.Socket, secret_key: str) -> None:
    """The server's keys on one more socket (the periodic streams'); the authenticator started by
    `server_curve` checks its clients too (it serves the whole context)."""
    public, secret = _load(secret_key, True, "server.curve.secret_key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def client_curve(sock: zmq.Socket, server_key: str, client_cert: str | None) -> None:
    """Make `sock` a CURVE client of the server whose public key is in `server_key` (before connect)."""
    _need_curve()
    server_public, _ = _load(server_key, False, "server key")
    if client_cert is None:
        public, secret = zmq.curve_keypair()  # encryption only; an allow-list server refuses it
    else:
        public, secret = _load(client_cert, True, "client certificate")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
