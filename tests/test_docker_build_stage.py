"""Dockerfile.rtx's build stage run natively, without Docker, on a machine with nvcc (pytest -m gpu).

The stage's own RUN commands are executed by bash, changed only in where they write (a scratch
folder instead of /opt and /wheels) and without BuildKit's cache mounts. The torch step is the one
part not run: the machine's torch stands in for the index's (the new environment sees it through a
.pth file, as --system-site-packages would), and the stage's own command turns it into the
constraints file. Then: the pinned build tools, the kernels compiled for the Dockerfile's default
FLASHRT_CUDA_ARCHS, the wheel check, the requirements, the --no-deps install, the smoke test; and
the installed console scripts serve configs/demo.yaml and answer the healthcheck's ping.

Needs nvcc >= 12.8 (sm_120) and the build tools from PyPI, or from a folder of wheels named by
FLASHRT_WHEELHOUSE on a machine without network.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_containers import ROOT, _free_port, healthcheck, load_dockerfile

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _bash(cmd: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"{cmd[:400]}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


def test_rtx_build_stage_natively(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    assert Path(nvcc).exists(), "nvcc not found: this test needs the CUDA toolkit"
    import torch  # the stand-in for the index's torch

    dockerfile = load_dockerfile("rtx")
    build = dockerfile.stage("build")
    archs = dockerfile.global_args["FLASHRT_CUDA_ARCHS"]

    # COPY . /src, as the .dockerignore whitelist leaves it
    src = tmp_path / "src"
    src.mkdir()
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if line.startswith("!") and (ROOT / line[1:]).exists():
            p = ROOT / line[1:]
            if p.is_dir():
                shutil.copytree(p, src / p.name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
            else:
                shutil.copy(p, src / p.name)
    if not (src / "README.md").exists():  # pyproject's readme; the lead's README may not exist yet
        (src / "README.md").write_text("FlashRT\n")

    def moved(cmd: str) -> str:
        cmd = re.sub(r"--mount=\S+", "", cmd)
        cmd = cmd.replace("python3 -m venv", f"{sys.executable} -m venv")
        return cmd.replace("/opt/build", str(tmp_path / "build")).replace("/opt/venv", str(tmp_path / "venv")) \
                  .replace("/wheels", str(tmp_path / "wheels"))

    env = {**os.environ, "FLASHRT_CUDA_ARCHS": archs, "FLASHRT_REQUIRE_KERNELS": "1", "CUDACXX": nvcc,
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.update({k: v for k, v in build.env().items() if k.startswith("CMAKE_") and shutil.which("ccache")})
    if os.environ.get("FLASHRT_WHEELHOUSE"):
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=os.environ["FLASHRT_WHEELHOUSE"])

    runs = build.runs()
    tools = next(r for r in runs if "scikit-build-core==" in r)
    _bash(moved(tools), env, tmp_path)
    site = Path(torch.__file__).parent.parent
    (next((tmp_path / "venv/lib").glob("python3*")) / "site-packages/_machine_torch.pth").write_text(f"{site}\n")

    torch_run = next(r for r in runs if "torch==${TORCH_VERSION}" in r)
    for part in moved(torch_run).split(" && "):
        if "constraints.txt" in part:  # the stage's own constraint line, on the stand-in torch
            _bash(part, env, tmp_path)
    assert (tmp_path / "venv/constraints.txt").read_text() == f"torch=={torch.__version__}\n"

    env["PIP_CONSTRAINT"] = str(tmp_path / "venv/constraints.txt")
    wheel_run = next(r for r in runs if "pip wheel" in r)
    out = _bash(moved(wheel_run), env, src).stdout
    assert "flashrt._kernels built: True" in out
    assert f"torch {torch.__version__}" in out

    python = tmp_path / "venv/bin/python"
    probe = subprocess.run([python, "-c", "from flashrt import _kernels; print(_kernels.archs())"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str([f"sm_{a}" for a in archs.split(";")])

    # the installed console scripts: the image's command serves, its healthcheck answers
    entrypoint = [str(tmp_path / "venv/bin" / "flashrt-serve"), "--config"]
    _, health = healthcheck(dockerfile.final)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ping = [str(tmp_path / "venv/bin" / health[1]), *health[2:]]
    ping[ping.index("--endpoint") + 1] = endpoint
    server = subprocess.Popen([*entrypoint, str(src / "configs/demo.yaml"), "--bind", endpoint], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(ping, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "the demo did not answer ping"
            time.sleep(0.5)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
