"""The platform table: every precision and backend choice in FlashRT reads it.

`detect()` looks at the machine once (the first CUDA device, or the CPU) and returns a `Platform`.
Nothing else in the project branches on compute capability: it asks the platform.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import torch

from .errors import PlatformError


@dataclass(frozen=True)
class Platform:
    name: str  # orin | thor | rtx-ada | rtx-blackwell | hopper | cuda | cpu
    device: str  # "cuda:N" or "cpu"
    capability: tuple[int, int] | None
    gpu_name: str
    default_precision: str
    precisions: tuple[str, ...]  # what this platform can run
    attention: str  # "flash_varlen" (FlashAttention varlen through torch) or "sdpa" (masked SDPA)
    cuda_graphs: bool
    native_kernels: bool  # flashrt._kernels is built for this GPU and may be used
    # Query rows (tokens x heads) up to which attention runs FlashRT's split-K kernel instead of
    # `attention` (the denoising steps' 50 x 8 rows against the prefix cache); 0: never.
    native_attention_rows: int = 0
    # The denoising steps prefetch each expert GEMM's weights into L2 beside the GEMM before it
    # (ops.prefetch_l2).
    l2_prefetch: bool = False
    # In bf16, the action expert's o and down projections run FlashRT's split-K few-row GEMM
    # (csrc/skinny_gemm.cu) on weights tiled at load; the norms after them sum its partials.
    skinny_gemm: bool = False
    _attention_forced: bool = False  # set when a config overrides the attention choice

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def attention_for(self, precision: str) -> str:
        """The attention backend for a precision: FlashAttention runs only in fp16/bf16."""
        if precision == "fp32":
            if self.attention == "flash_varlen" and self._attention_forced:
                raise PlatformError("attention 'flash_varlen' needs fp16 or bf16 precision, not fp32")
            return "sdpa"
        return self.attention

    def resolve_precision(self, requested: str) -> str:
        if requested == "auto":
            return self.default_precision
        if requested not in self.precisions:
            raise PlatformError(
                f"precision {requested!r} is not supported on {self.name} ({self.gpu_name}); "
                f"supported: {', '.join(self.precisions)}"
            )
        return requested


# (major, minor) -> (platform name, default precision), as DESIGN.md sets them: INT8 W8A8 on Orin
# (no FP8 tensor cores on sm_87), FP8 on Thor and RTX, bf16 on Hopper (FP8 there on request: on the
# H100 it is 1.23x faster for Pi0.5, with a worst cosine to bf16 of 0.999 for Pi0.5 and 0.9956 for
# Pi0; see benchmarks/results/quant_*.json).
_GPUS: dict[tuple[int, int], tuple[str, str]] = {
    (8, 7): ("orin", "int8"),
    (8, 9): ("rtx-ada", "fp8"),
    (9, 0): ("hopper", "bf16"),
    (11, 0): ("thor", "fp8"),
    (12, 0): ("rtx-blackwell", "fp8"),
    (12, 1): ("rtx-blackwell", "fp8"),
}


def _precisions(cap: tuple[int, int]) -> tuple[str, ...]:
    """FP8 GEMMs (torch._scaled_mm) need sm_89+; INT8 ones (torch._int_mm) sm_80+."""
    if cap < (8, 0):
        return ("fp32", "fp16")
    return ("fp32", "bf16", "fp16", "int8") + (("fp8",) if cap >= (8, 9) else ())


# Split-K attention (flashrt._kernels) for few query rows against the one-head prefix cache: the
# largest query-row count for which it replaces PyTorch's FlashAttention/SDPA. Measured on the H100
# with benchmarks/kernels.py (results in benchmarks/results/); the other GPUs run the same
# mma.sync kernel (sm_80+ instructions, 96 KB of shared memory, within every target's limit) and
# take the same bound until measured there.
_NATIVE_ATTENTION_ROWS: dict[str, int] = {
    "hopper": 1024,
    "orin": 1024,
    "rtx-ada": 1024,
    "rtx-blackwell": 1024,
    "thor": 1024,
}


# Where prefetching the expert's weights into L2 was measured to pay (benchmarks/platform_ab.py
# l2_prefetch; H100: -0.55 ms bf16 with the skinny GEMM, -0.36 ms FP8 for Pi0.5). Elsewhere it stays
# off until measured: Orin's 4 MB L2 cannot hold one projection.
_L2_PREFETCH = {"hopper"}

# Where the expert's o and down through csrc/skinny_gemm.cu were measured to pay (benchmarks/platform_ab.py
# skinny_gemm, H100 bf16: Pi0.5 2 cams 14.40 -> 13.95 ms, Pi0 3 cams 17.66 -> 17.39 ms).
# Its CTAs hold up to ~120 KB of shared memory (down's); elsewhere it stays off until measured.
_SKINNY_GEMM = {"hopper"}


def _arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS for `arch` ("sm_90", "sm_90a", "sm_120") runs on a GPU of `capability`.

    Plain sm_XY code runs on X.Z for Z >= Y (same major); arch-specific sm_XYa code only on X.Y.
    """
    m = re.fullmatch(r"sm_(\d+?)(\d)([af]?)", arch)
    if m is None:
        return False
    major, minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
    if suffix:
        return (major, minor) == tuple(capability)
    return major == capability[0] and minor <= capability[1]


def _kernels_built_for(capability: tuple[int, int]) -> bool:
    try:
        from . import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return False
    archs = _kernels.archs() if hasattr(_kernels, "archs") else []
    return any(_arch_runs_on(a, capability) for a in archs)


def _has_flash_varlen(capability: tuple[int, int]) -> bool:
    # FlashAttention-2 inside PyTorch needs sm_80+ and a build with it (Jetson source builds may omit it).
    return capability >= (8, 0) and torch.backends.cuda.is_flash_attention_available()


def probe(device: str | None = None) -> Platform:
    """Describe `device` (default: the first GPU if there is one, else the CPU)."""
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # fp8/int8 run on the CPU too (slowly): their numerics are checkable without a GPU.
        return Platform("cpu", "cpu", None, "cpu", "fp32", ("fp32", "bf16", "fp8", "int8"), "sdpa", False, False)
    if not torch.cuda.is_available():
        raise PlatformError(f"device {device!r} requested but no CUDA GPU is visible")
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else 0
    cap = torch.cuda.get_device_capability(idx)
    name, precision = _GPUS.get(cap, ("cuda", "bf16" if cap >= (8, 0) else "fp16"))
    precisions = _precisions(cap)
    native = _kernels_built_for(cap)
    return Platform(
        name=name,
        device=f"cuda:{idx}",
        capability=cap,
        gpu_name=torch.cuda.get_device_name(idx),
        default_precision=precision,
        precisions=precisions,
        attention="flash_varlen" if _has_flash_varlen(cap) else "sdpa",
        cuda_graphs=True,
        native_kernels=native,
        native_attention_rows=_NATIVE_ATTENTION_ROWS.get(name, 1024) if native else 0,
        l2_prefetch=native and name in _L2_PREFETCH,
        skinny_gemm=native and name in _SKINNY_GEMM,
    )


@functools.lru_cache(maxsize=None)
def detect(device: str | None = None) -> Platform:
    """The platform, probed once per device."""
    return probe(device)


def for_config(device: str = "auto", **overrides) -> Platform:
    """The platform a model config asks for: `device` auto/cpu/cuda[:N], plus field overrides."""
    plat = detect(None if device == "auto" else device)
    return replace(plat, **overrides) if overrides else plat
