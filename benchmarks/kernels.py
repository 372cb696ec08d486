"""Micro-benchmark: each native kernel (flashrt._kernels) against its torch op, real Pi0.5 shapes.

    python benchmarks/kernels.py [--out PATH] [--quick]

Each op is captured in a CUDA graph as `reps` back-to-back calls on the same inputs (as in the
model, where they follow the GEMM that produced them, so small inputs sit in L2) and the graph is
replayed; the time per call is the median replay time / reps, which includes the ~1-2 us per-node
gap of graph replay (reported as `node_us`, the time per call of a trivial kernel). Bytes are the
fewest the op must move (each input read once, each output written once); GB/s is bytes / native
time, and `frac_copy` is that over the measured device-to-device copy bandwidth (read + write).
Results go to benchmarks/results/kernels_<gpu>.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import platform as pyplatform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashrt import hardware, preprocess
from flashrt.ops import native, torch_ops

DEV = "cuda"
EPS = 1e-6


def graph_time_us(fn, reps: int = 20, iters: int = 30) -> float:
    """Median microseconds per call of fn, from replays of a graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    del g
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth_gbps() -> float:
    n = 1 << 29  # 1 GiB of bytes per side
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    us = graph_time_us(lambda: dst.copy_(src), reps=5, iters=10)
    return 2 * n / (us * 1e-6) / 1e9


def node_us() -> float:
    t = torch.zeros(1, device=DEV)
    return graph_time_us(lambda: t.add_(1), reps=50, iters=30)


def r(*shape, dtype=torch.bfloat16, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV) * scale + shift).to(dtype)


def cases(dtype):
    """(name, count per Pi0.5 inference (2 cameras, 10 steps), native fn, torch fn, bytes)."""
    es = torch.tensor([], dtype=dtype).element_size()
    out = []
    # norms
    # prefix: the last VLM layer stops after attention (kv_only), so 17 layers x 2 residual norms
    for name, t, w, count in [("prefix", 712, 2048, 34), ("expert", 50, 1024, 0)]:
        x, y = r(t, w, dtype=dtype, scale=3), r(t, w, dtype=dtype)
        out.append((f"add_rms_norm {name} [{t},{w}]", count, lambda x=x, y=y: native.add_rms_norm(x, y, EPS),
                    lambda x=x, y=y: torch_ops.add_rms_norm(x, y, EPS), 4 * t * w * es))
    x, y = r(50, 1024, dtype=dtype, scale=3), r(50, 1024, dtype=dtype)
    sc, sh, g = r(1024, dtype=dtype, shift=1, scale=0.1), r(1024, dtype=dtype, scale=0.1), r(1024, dtype=dtype)
    out.append(("ada_rms_norm expert [50,1024]", 10, lambda: native.ada_rms_norm(x, sc, sh, EPS),
                lambda: torch_ops.ada_rms_norm(x, sc, sh, EPS), 2 * 50 * 1024 * es))
    out.append(("add_ada_rms_norm expert [50,1024]", 360, lambda: native.add_ada_rms_norm(x, y, g, sc, sh, EPS),
                lambda: torch_ops.add_ada_rms_norm(x, y, g, sc, sh, EPS), 4 * 50 * 1024 * es))
    xs, ys = r(512, 1152, dtype=dtype, scale=3), r(512, 1152, dtype=dtype)
    lw, lb = r(1152, dtype=dtype, shift=1, scale=0.1), r(1152, dtype=dtype, scale=0.1)
    out.append(("add_layer_norm siglip [512,1152]", 54, lambda: native.add_layer_norm(xs, ys, lw, lb, EPS),
                lambda: torch_ops.add_layer_norm(xs, ys, lw, lb, EPS), 4 * 512 * 1152 * es))
    # GeGLU
    for name, t, m, count in [("prefix", 712, 16384, 17), ("expert", 50, 4096, 180)]:
        gu = r(t, 2 * m, dtype=dtype, scale=2)
        out.append((f"gelu_tanh_mul {name} [{t},{2 * m}]", count, lambda gu=gu: native.gelu_tanh_mul(gu),
                    lambda gu=gu: torch_ops.gelu_tanh_mul(gu), 3 * t * m * es))
    # RoPE + cache
    heads, d = 8, 256
    for name, t, count in [("prefix", 712, 18), ("expert", 50, 180)]:
        qkv = r(t, (heads + 2) * d, dtype=dtype)
        cos, sin = r(t, d, dtype=dtype), r(t, d, dtype=dtype)
        kc, vc = r(1000, d, dtype=dtype), r(1000, d, dtype=dtype)
        slots = None if name == "prefix" else torch.arange(712, 762, device=DEV)
        out.append((f"rope_qkv {name} T={t}", count,
                    lambda a=(qkv, cos, sin, heads, kc, vc, slots): native.rope_qkv(*a),
                    lambda a=(qkv, cos, sin, heads, kc, vc, slots): torch_ops.rope_qkv(*a),
                    (2 * t * (heads + 2) * d + 2 * t * d) * es))
    # Euler update
    acc, hx, ow, ob = torch.randn(50, 32, device=DEV), r(50, 1024, dtype=dtype), r(32, 1024, dtype=dtype), r(32, dtype=dtype)
    out.append(("linear_accumulate [50,1024]x[32,1024]", 10, lambda: native.linear_accumulate(acc, hx, ow, ob),
                lambda: torch_ops.linear_accumulate(acc, hx, ow, ob), (50 * 1024 + 32 * 1024 + 32) * es + 2 * 50 * 32 * 4))
    # attention, the denoising steps' suffix against the prefix cache
    if dtype != torch.float32:
        attn = native.make_attention_flash_varlen(1024)
        for t, n, count in [(50, 762, 180), (50, 1018, 0), (1, 769, 0)]:
            q = r(t, heads, d, dtype=dtype, scale=0.1)
            kc, vc = r(n, d, dtype=dtype), r(n, d, dtype=dtype)
            cu_q = torch.tensor([0, t * heads], dtype=torch.int32, device=DEV)
            cu_k = torch.tensor([0, n], dtype=torch.int32, device=DEV)
            out.append((f"attention {t * heads} rows x {n} keys", count,
                        lambda a=(q, kc, vc, cu_q, cu_k, t * heads, n): attn(*a),
                        lambda a=(q, kc, vc, cu_q, cu_k, t * heads, n): torch_ops.attention_flash_varlen(*a),
                        (2 * t * heads * d + 2 * n * d) * es))
    # preprocessing: two cameras, one 224x224 and one 480x640
    imgs = [torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, device=DEV),
            torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, device=DEV)]
    o = torch.empty(2, 3, 224, 224, dtype=dtype, device=DEV)
    out.append(("images_to_model 224x224 + 480x640", 1, lambda: native.images_to_model(imgs, o),
                lambda: preprocess.images_to_model(imgs, o), (224 * 224 * 3 + 480 * 640 * 3) + 2 * 3 * 224 * 224 * es))
    return out


def attention_sweep(dtype, rows_tokens=50, n=762):
    heads, d = 8, 256
    q = r(rows_tokens * heads, d, dtype=dtype, scale=0.1)
    kc, vc = r(n, d, dtype=dtype), r(n, d, dtype=dtype)
    cu_k = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    res = {}
    for warps in (2, 4):
        for splits in (1, 4, 6, 8, 12, 16, 24, 32):
            res[f"w{warps}s{splits}"] = graph_time_us(
                lambda s=splits, w=warps: native.attention_decode(q, kc, vc, None, cu_k, None, splits=s, warps=w))
    qq = q.view(rows_tokens, heads, d)
    mask = torch.ones(n, dtype=torch.bool, device=DEV)
    res["torch_sdpa_mask"] = graph_time_us(lambda: torch_ops.attention_sdpa(qq, kc, vc, mask))
    res["default"] = f"w{native.ATTN_WARPS}s{native.attention_splits(rows_tokens * heads, n, q.device)}"
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dtypes", default="bf16,fp16")
    args = ap.parse_args()
    assert native.available(), "flashrt._kernels is not built"
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = torch.cuda.get_device_name()
    plat = hardware.detect()
    bw = copy_bandwidth_gbps()
    node = node_us()
    result = {"gpu": gpu, "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
              "cuda": torch.version.cuda, "kernels_archs": native._kernels.archs(),
              "kernels_cuda": native._kernels.cuda_version, "python": pyplatform.python_version(),
              "platform": plat.name, "native_attention_rows": plat.native_attention_rows,
              "copy_GBps": round(bw, 1), "node_us": round(node, 2), "kernels": [], "attention_splits": {}}
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dn in args.dtypes.split(","):
        dtype = dtypes[dn]
        saved = 0.0
        for name, count, fn_native, fn_torch, nbytes in cases(dtype):
            tn = graph_time_us(fn_native)
            tt = graph_time_us(fn_torch)
            gbps = nbytes / (tn * 1e-6) / 1e9
            saved += count * (tt - tn)
            result["kernels"].append({
                "name": name, "dtype": dn, "count_per_inference": count, "native_us": round(tn, 2),
                "torch_us": round(tt, 2), "speedup": round(tt / tn, 2), "bytes": int(nbytes),
                "native_GBps": round(gbps, 1), "frac_copy": round(gbps / bw, 3)})
        result[f"saved_ms_per_inference_{dn}"] = round(saved / 1e3, 3)
        result["attention_splits"][dn] = {}
        for tokens, n in ((50, 762), (50, 1018), (1, 769)):
            result["attention_splits"][dn][f"{tokens * 8}x{n}"] = {
                str(k): (round(v, 2) if isinstance(v, float) else v) for k, v in attention_sweep(dtype, tokens, n).items()}
    safe = "".join(c if c.isalnum() else "_" for c in gpu).strip("_")
    path = args.out or Path(__file__).parent / "results" / f"kernels_{safe}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{gpu}: copy {bw:.0f} GB/s, graph node {node:.2f} us; results in {path}")
    for dn in args.dtypes.split(","):
        for shape, sw in result["attention_splits"][dn].items():
            print(f"attention {shape} {dn} (w=warps, s=splits): " + " ".join(f"{k}:{v}" for k, v in sw.items()))
    print(f"{'kernel':44s} {'dtype':5s} {'native us':>9s} {'torch us':>9s} {'speedup':>7s} {'GB/s':>7s} {'of copy':>7s}")
    for k in result["kernels"]:
        print(f"{k['name']:44s} {k['dtype']:5s} {k['native_us']:9.2f} {k['torch_us']:9.2f} {k['speedup']:7.2f} "
              f"{k['native_GBps']:7.0f} {k['frac_copy']:7.1%}")
    for dn in args.dtypes.split(","):
        print(f"kernel time saved per Pi0.5 inference ({dn}, counts as listed): {result[f'saved_ms_per_inference_{dn}']} ms")
    return 0 if all(math.isfinite(k["native_us"]) for k in result["kernels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
