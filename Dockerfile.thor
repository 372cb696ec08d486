# syntax=docker/dockerfile:1
#
# FlashRT for Jetson AGX Thor: JetPack 7 (L4T r38), CUDA 13.0, Python 3.12, sm_110.
#
#   COMPOSE_FILE=compose.yaml:compose.thor.yaml docker compose up      # or set it in .env
#   docker build -f Dockerfile.thor -t flashrt:thor-r38-cu130 .
#   docker run --runtime nvidia --network host flashrt:thor-r38-cu130 /config/pi05_libero.yaml
#
# The image runs only on a JetPack 7 host (r38 or r39); JetPack 6 images do not run on Thor. Give it
# the GPU with the NVIDIA container runtime (`--runtime nvidia`, `runtime: nvidia`), as on Orin.
# docs/deployment.md has the whole procedure.

# NGC PyTorch 25.09 (arm64 manifest: CUDA 13.0, PyTorch 2.9 built with sm_110, Python 3.12,
# Ubuntu 24.04) is the PyTorch that is known to run on Thor (Isaac-GR00T and FlashRT's own Thor
# images use it); JetPack 7 is a standard SBSA CUDA stack, so there is no -igpu tag. Its torch,
# CUDA 13 libraries, cuDNN and NCCL are all needed at run time, so it is the base of both stages;
# the runtime stage stays lean by taking only the small virtual environment built on top of it
# (no sources, build tools or caches).
ARG NGC_PYTORCH_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3

# GPU architectures of the native kernels (CMake list syntax), fixed here and never detected at
# build time: BuildKit steps see no GPU. Thor is sm_110 under CUDA 13 (it was sm_101 under CUDA
# 12.9; nvcc 13 refuses sm_101).
ARG FLASHRT_CUDA_ARCHS=110

# ------------------------------------------------------------------------------------------------
FROM ${NGC_PYTORCH_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG FLASHRT_CUDA_ARCHS
# 1: fail the build when the wheel has no flashrt/_kernels (a silent fall-back to the PyTorch
# reference ops would cost latency unnoticed). 0 builds a pure-Python image.
ARG FLASHRT_REQUIRE_KERNELS=1
# Build-time only (an ENV would stay set in the image).
ARG DEBIAN_FRONTEND=noninteractive

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-dev ccache \
 && rm -rf /var/lib/apt/lists/*

# Two environments: /opt/build holds the build backend (scikit-build-core, pybind11, CMake, ninja)
# and never reaches the runtime stage; its tools are pinned here, so NGC's pip constraints (set by
# environment or pip.conf) are switched off for it. /opt/venv is what runs: it sees the system
# site-packages, so the NGC torch is the torch it imports. Its constraints file holds NGC's own
# pins (/etc/pip/constraint.txt, which keeps the image's compiled packages at the versions NGC
# tested) plus torch's exact version; every later pip command uses it (PIP_CONSTRAINT stays set in
# the runtime image too).
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/build \
 && PIP_CONFIG_FILE=/dev/null PIP_CONSTRAINT='' \
    /opt/build/bin/pip install pip==26.3 scikit-build-core==1.1.2 pybind11==3.1.0 cmake==4.4.4 ninja==1.13.2 \
 && python3 -m venv --system-site-packages /opt/venv \
 && { cat /etc/pip/constraint.txt 2>/dev/null || true; \
      /opt/venv/bin/python -c "import torch; print(f'torch=={torch.__version__}')"; } > /opt/venv/constraints.txt \
 && grep '^torch==' /opt/venv/constraints.txt

COPY . /src
WORKDIR /src

# Compile csrc/ into flashrt._kernels for FLASHRT_CUDA_ARCHS (ccache keeps objects between builds)
# and check the wheel has it. Then install flashrt with --no-deps and its other requirements, read
# from the wheel's own metadata minus torch: torch never enters pip's resolution again, so neither
# it nor its dependencies can be replaced (the constraints file stays set as a second guard).
# Last, a CPU-only smoke test (no GPU is visible during a build; it fails on a CPU-only torch).
ENV CCACHE_DIR=/ccache \
    CMAKE_CUDA_COMPILER_LAUNCHER=ccache \
    CMAKE_CXX_COMPILER_LAUNCHER=ccache \
    CUDACXX=/usr/local/cuda/bin/nvcc \
    PIP_CONSTRAINT=/opt/venv/constraints.txt
RUN --mount=type=cache,target=/ccache,sharing=locked \
    --mount=type=cache,target=/root/.cache/pip \
    FLASHRT_CUDA_ARCHS="${FLASHRT_CUDA_ARCHS}" \
    /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/python -c "import glob, sys, zipfile; from packaging.requirements import Requirement; whl = zipfile.ZipFile(glob.glob('/wheels/flashrt-*.whl')[0]); names = whl.namelist(); built = any(n.startswith('flashrt/_kernels') for n in names); meta = whl.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode(); reqs = [Requirement(line.split(':', 1)[1]) for line in meta.splitlines() if line.startswith('Requires-Dist:')]; open('/wheels/requirements.txt', 'w').write(''.join(f'{r}\n' for r in reqs if r.name != 'torch' and 'extra' not in str(r.marker))); print('flashrt._kernels built:', built); sys.exit(0 if built or '${FLASHRT_REQUIRE_KERNELS}' == '0' else 'flashrt/_kernels is missing from the wheel: no CUDA compiler found, or csrc/ built nothing')" \
 && /opt/venv/bin/pip install --requirement /wheels/requirements.txt \
 && /opt/venv/bin/pip install --no-deps /wheels/flashrt-*.whl \
 && /opt/venv/bin/python -c "import torch, flashrt, runtime; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'archs', torch._C._cuda_getArchFlags())"

# ------------------------------------------------------------------------------------------------
FROM ${NGC_PYTORCH_IMAGE} AS runtime
ARG FLASHRT_CUDA_ARCHS
LABEL org.opencontainers.image.title="flashrt" \
      org.opencontainers.image.description="FlashRT realtime VLA policy server, Jetson AGX Thor (JetPack 7, L4T r38, CUDA 13.0)" \
      ai.flashrt.platform="thor" \
      ai.flashrt.cuda-archs="${FLASHRT_CUDA_ARCHS}"

ENV PATH=/opt/venv/bin:${PATH} \
    PIP_CONSTRAINT=/opt/venv/constraints.txt \
    HF_HOME=/data/huggingface \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A non-root user (numeric in USER below, so runAsNonRoot-style checks can verify it), in `video`,
# the group that owns the Jetson GPU device nodes (gid 44 in host and image alike). The cache
# directory belongs to it, so a named volume mounted there starts out writable.
RUN useradd --system --uid 10001 --user-group --groups video --create-home --home-dir /home/flashrt flashrt \
 && mkdir -p /data/huggingface \
 && chown flashrt:flashrt /data/huggingface

COPY --from=build /opt/venv /opt/venv
# The import check again, on the runtime base: catches a library the build stage had and this lacks.
RUN python -c "import flashrt, runtime"

# Example deployment configs; compose mounts ./configs over /config read-only.
COPY configs/ /config/
VOLUME ["/data/huggingface", "/config"]

USER 10001
WORKDIR /home/flashrt
EXPOSE 5555
# The server stops cleanly on SIGINT, and before it installs its handlers (the minutes of load and
# capture) Python still turns SIGINT into KeyboardInterrupt, even as PID 1 without an init process,
# where a SIGTERM would be ignored until Docker's kill.
STOPSIGNAL SIGINT
# Model load and CUDA-graph capture take minutes on first start: failed probes within the start
# period do not count. (No --start-interval: Docker Engines before 25 do not know it.)
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
    CMD ["flashrt-client", "--ping", "--endpoint", "tcp://127.0.0.1:5555", "--timeout-ms", "3000"]
# Replaces the NGC image's own entrypoint script (a banner and driver checks meant for
# interactive shells).
ENTRYPOINT ["flashrt-serve", "--config"]
CMD ["/config/pi05_libero.yaml"]
