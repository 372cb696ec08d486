"""The command line as a user runs it: flashrt-serve / flashrt-client in subprocesses, SIGHUP reload,
SIGTERM stop, the torch-free client, and scripts/demo.sh (the README's main command)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml
import zmq

from runtime.client import PolicyClient

PY = [sys.executable, "-m", "runtime"]  # the entry points' functions (flashrt-serve / flashrt-client)


def demo_config(tmp_path, **model_changes) -> tuple[str, str]:
    """configs/demo.yaml served on an ipc socket of this test's own (no port collisions)."""
    data = yaml.safe_load(open("configs/demo.yaml"))
    endpoint = f"ipc://{tmp_path}/flashrt.sock"
    data["server"] = {"bind": endpoint}
    data["models"][0].update(model_changes)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), endpoint


def client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*PY, "client", *args], capture_output=True, text=True, timeout=timeout)


def wait_for_ping(endpoint: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while client("--endpoint", endpoint, "--ping", "--timeout-ms", "500").returncode != 0:
        assert server.poll() is None, server.communicate()[1]
        assert time.monotonic() < deadline, "the server never answered ping"


def test_serve_client_reload_and_stop(tmp_path):
    path, endpoint = demo_config(tmp_path)
    server = subprocess.Popen([*PY, "serve", "--config", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for_ping(endpoint, server)
        out = client("--endpoint", endpoint, "-n", "2", "--prompt", "stack the cups")
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("actions [10, 7] float32") == 2 and "round trip" in out.stdout

        # The client on a robot computer: no torch, no flashrt engine.
        no_torch = subprocess.run([sys.executable, "-c", (
            "import sys; sys.modules['torch'] = None; sys.modules['flashrt'] = None\n"
            "from runtime.cli import client_main\n"
            f"code = client_main(['--endpoint', '{endpoint}', '-n', '1'])\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "sys.exit(code)")], capture_output=True, text=True, timeout=60)
        assert no_torch.returncode == 0, no_torch.stderr
        assert "actions [10, 7]" in no_torch.stdout

        # SIGHUP: the changed config file is loaded beside the running model, then swapped in.
        demo_config(tmp_path, num_steps=4)
        server.send_signal(signal.SIGHUP)
        with PolicyClient(endpoint, timeout_ms=10_000) as c:
            deadline = time.monotonic() + 60
            while c.models()[0]["generation"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert c.metadata()["spec"]["num_steps"] == 4

        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert "stopped" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_ping_fails_without_a_server(tmp_path):
    out = client("--endpoint", f"ipc://{tmp_path}/nobody.sock", "--ping", "--timeout-ms", "200", timeout=20)
    assert out.returncode == 1 and "no reply" in out.stderr


def test_serve_refuses_a_bad_config(tmp_path):
    path, _ = demo_config(tmp_path, state_dim=0)
    out = subprocess.run([*PY, "serve", "--config", path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert path in out.stderr and "models[0].state_dim" in out.stderr


def test_serve_refuses_a_short_admin_token_from_the_environment(tmp_path):
    path, _ = demo_config(tmp_path)
    out = subprocess.run([*PY, "serve", "--config", path], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FLASHRT_ADMIN_TOKEN": "short"})
    assert out.returncode == 1 and "FLASHRT_ADMIN_TOKEN" in out.stderr


def test_serve_refuses_a_taken_port(tmp_path):
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        path, _ = demo_config(tmp_path)
        out = subprocess.run([*PY, "serve", "--config", path, "--bind", f"tcp://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and f"cannot bind tcp://127.0.0.1:{port}" in out.stderr
    finally:
        taken.close(linger=0)


def test_demo_script(tmp_path):
    env = {**os.environ, "FLASHRT_DEMO_ENDPOINT": f"ipc://{tmp_path}/demo.sock"}
    out = subprocess.run(["bash", "scripts/demo.sh"], capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("actions [10, 7] float32") == 8 and out.stdout.rstrip().endswith("demo: ok")
