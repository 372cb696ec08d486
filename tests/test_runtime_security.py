"""CURVE: encryption with an allow-list of client keys; unknown and plaintext clients get nothing."""

from __future__ import annotations

import pytest
import zmq
import zmq.auth

from runtime.client import ActionSubscriber, ObservationPublisher, PolicyClient
from runtime.server import Server
from runtime_fakes import FakeLoader, deployment, first_chunk, observation, periodic


def test_libzmq_has_curve():
    assert zmq.has("curve")  # pyzmq's bundled libzmq is built with it


@pytest.fixture
def keys(tmp_path):
    (tmp_path / "allowed").mkdir()
    (tmp_path / "other").mkdir()
    _, server_secret = zmq.auth.create_certificates(tmp_path, "server")
    robot_public, robot_secret = zmq.auth.create_certificates(tmp_path / "allowed", "robot")
    _, stranger_secret = zmq.auth.create_certificates(tmp_path / "other", "stranger")
    return {"server_secret": server_secret, "server_public": str(tmp_path / "server.key"),
            "allowed": str(tmp_path / "allowed"), "robot": robot_secret, "stranger": stranger_secret}


def test_curve_allow_list(keys):
    config = deployment(curve={"secret_key": keys["server_secret"], "clients": keys["allowed"]})
    with Server(config, loader=FakeLoader()) as server:
        endpoint = server.bound[0]
        with PolicyClient(endpoint, server_key=keys["server_public"], client_cert=keys["robot"]) as robot:
            assert robot.infer(observation(size=32))["actions"].shape == (10, 7)
        # a client with a key that is not on the list: the handshake fails, no reply ever comes
        with PolicyClient(endpoint, server_key=keys["server_public"], client_cert=keys["stranger"],
                          timeout_ms=400, retries=1) as stranger:
            with pytest.raises(TimeoutError):
                stranger.ping()
        with PolicyClient(endpoint, timeout_ms=400, retries=0) as plaintext:
            with pytest.raises(TimeoutError):
                plaintext.ping()
        with PolicyClient(endpoint, server_key=keys["server_public"], client_cert=keys["robot"]) as robot:
            assert robot.ping()["status"] == "ok"  # and the server still serves the allowed client


def test_curve_without_allow_list_encrypts_for_any_client_with_the_server_key(keys):
    with Server(deployment(curve={"secret_key": keys["server_secret"]}), loader=FakeLoader()) as server:
        with PolicyClient(server.bound[0], server_key=keys["server_public"]) as anyone:
            assert anyone.ping()["status"] == "ok"
        with PolicyClient(server.bound[0], timeout_ms=400, retries=0) as plaintext:
            with pytest.raises(TimeoutError):
                plaintext.ping()


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="server.curve.secret_key"):
        Server(deployment(curve={"secret_key": str(tmp_path / "none.key_secret")}), loader=FakeLoader()).start()


def test_curve_protects_the_periodic_streams(keys):
    """The PUB and SUB sockets use the server's keys and allow-list too: nobody else can read the
    actions, and nobody else can steer the robot by publishing observations."""
    config = deployment(periodic("cam", 20), curve={"secret_key": keys["server_secret"], "clients": keys["allowed"]})
    with Server(config, loader=FakeLoader()) as server:
        robot = {"server_key": keys["server_public"], "client_cert": keys["robot"]}
        with ObservationPublisher(server.streams["observe"], **robot) as pub, \
                ActionSubscriber(server.streams["publish"], "cam", **robot) as sub:
            assert first_chunk(pub, sub, "cam", observation(1, size=8))["actions"][0, 0] == 1001.0
            with ActionSubscriber(server.streams["publish"], "cam") as spy, \
                    ActionSubscriber(server.streams["publish"], "cam", server_key=keys["server_public"],
                                     client_cert=keys["stranger"]) as stranger:
                for s in (spy, stranger):
                    with pytest.raises(TimeoutError):
                        s.recv(timeout_ms=300)
            with ObservationPublisher(server.streams["observe"]) as intruder:
                for _ in range(10):
                    intruder.publish("cam", observation(99, size=8))
                    sub.recv()
            assert sub.latest()["actions"][0, 0] == 1001.0  # the intruder's observations never arrived
