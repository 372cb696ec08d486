"""Shared by the GPU benchmarks: timing with CUDA events, the GPU's ceilings, LeRobot's models.

LeRobot (PyPI `lerobot==0.6.1`, the peer we compare against) is imported only here and only when a
benchmark asks for it; see ../shared/peers/README.md for how its wheels reach the GPU machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def percentiles(ts: list[float]) -> dict:
    a = np.sort(np.asarray(ts))
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "min": float(a[0]), "n": len(a)}


def cuda_timed(fn, warmup: int = 5, iters: int = 50) -> dict:
    """Milliseconds per call of `fn`, timed with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return percentiles(ts)


def wall_timed(fn, warmup: int = 5, iters: int = 50) -> dict:
    """Milliseconds per call of `fn` by the host clock (fn must synchronize itself)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return percentiles(ts)


def ceilings() -> dict:
    """Measured bf16 matrix rate and device copy bandwidth: the floors are computed against these."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_timed(lambda: a @ b, 3, 10)["p50"]
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    tc = cuda_timed(lambda: y.copy_(x), 2, 10)["p50"]
    out = {"bf16_tflops": 2 * n**3 / t / 1e9, "copy_TBps": 2 * x.numel() * 2 / tc / 1e9}
    del a, b, x, y
    torch.cuda.empty_cache()
    return out


def machine() -> dict:
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(name: str, data: dict) -> Path:
    """Write results as JSON under benchmarks/results and, on the GPU machine, under $OUT too."""
    gpu = data.get("machine", {}).get("gpu", "cpu").replace(" ", "_")
    text = json.dumps(data, indent=1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{gpu}.json"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    return path


def count_kernels(fn) -> int:
    """CUDA kernels one call of `fn` launches (run eagerly under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memcpy" not in e.name and "Memset" not in e.name)


def lerobot_model(kind: str, dtype: str, compile_mode: str | None = None):
    """LeRobot's own PI05Pytorch / PI0Pytorch at full size, built on the GPU."""
    if kind == "pi05":
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch as Model
    else:
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch as Model
    cfg = Config(dtype=dtype, device="cuda")
    if compile_mode:
        cfg.compile_model, cfg.compile_mode = True, compile_mode
    with torch.device("cuda"):
        return Model(cfg).eval(), cfg


def lerobot_inputs(kind: str, images_u8: list[np.ndarray], tokens: np.ndarray, max_len: int, state=None):
    """LeRobot's sample_actions arguments for the same images (uint8 HWC 224) and prompt tokens."""
    imgs = [torch.from_numpy(im).cuda().permute(2, 0, 1)[None].float() / 255 * 2 - 1 for im in images_u8]
    masks = [torch.ones(1, dtype=torch.bool, device="cuda") for _ in imgs]
    tok = torch.zeros(1, max_len, dtype=torch.long, device="cuda")
    tok[0, : len(tokens)] = torch.from_numpy(tokens)
    tmask = torch.zeros(1, max_len, dtype=torch.bool, device="cuda")
    tmask[0, : len(tokens)] = True
    if kind == "pi05":
        return dict(images=imgs, img_masks=masks, tokens=tok, masks=tmask)
    st = torch.zeros(1, 32, device="cuda")
    if state is not None:
        st[0, : len(state)] = torch.from_numpy(state)
    return dict(images=imgs, img_masks=masks, lang_tokens=tok, lang_masks=tmask, state=st)
