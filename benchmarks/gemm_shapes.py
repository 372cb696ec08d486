"""The GEMMs of Pi0.5 (2 cameras) through cuBLAS: what torch's choice costs at each shape, and
whether any other cuBLASLt algorithm would be faster.

    python benchmarks/gemm_shapes.py        # writes benchmarks/results/gemm_shapes_<gpu>.json

For every projection shape (SigLIP at 512 rows, the Gemma prefix at 560, the action expert at 50),
in bf16 and FP8 (E4M3 in, bf16 out, per-tensor scales): torch's call (`matmul`, `_scaled_mm`) and
every candidate cuBLASLt's heuristic offers for the same problem (y = x W^T, W row-major [out, in]),
each timed as the median of CUDA-graph replays of 40 calls, each call on another copy of the
weights so they come from HBM as in the model. cuBLASLt is reached through ctypes on the
libcublasLt torch has already loaded, so the candidates run in the very library torch uses.
The sums say how much of the model's time the GEMMs alone take, before any other kernel.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, save  # noqa: E402
from benchmarks.kernels import graph_time_us  # noqa: E402

ROWS = {"vision": 512, "prefix": 560, "expert": 50}
SHAPES = {  # (name, in, out)
    "vision": [("qkv", 1152, 3456), ("o", 1152, 1152), ("fc1", 1152, 4304), ("fc2", 4304, 1152)],
    "prefix": [("qkv", 2048, 2560), ("o", 2048, 2048), ("gate_up", 2048, 32768), ("down", 16384, 2048)],
    "expert": [("qkv", 1024, 2560), ("o", 2048, 1024), ("gate_up", 1024, 8192), ("down", 4096, 1024)],
}
CALLS = {"vision": 27, "prefix": 18, "expert": 18 * 10}  # per inference: layers (x 10 steps)

# cuBLASLt enums (cublasLt.h, library_types.h)
R_32F, R_16BF, R_8F_E4M3, COMPUTE_32F = 0, 14, 28, 68
DESC_TRANSA, DESC_TRANSB, DESC_A_SCALE, DESC_B_SCALE, PREF_MAX_WORKSPACE = 3, 4, 17, 18, 1
WORKSPACE = 32 << 20


class _Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class LtGemm:
    """y[m, n] (bf16) = x[m, k] @ w[n, k]^T in cuBLASLt's column-major terms: D[n, m] = W^T' X."""

    def __init__(self, lib, handle, m: int, n: int, k: int, fp8: bool, workspace: torch.Tensor):
        self.lib, self.handle, self.ws = lib, handle, workspace
        ab = R_8F_E4M3 if fp8 else R_16BF
        self.desc, vp = ctypes.c_void_p(), ctypes.c_void_p
        self._ok(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F))
        for attr, value in ((DESC_TRANSA, 1), (DESC_TRANSB, 0)):
            v = ctypes.c_int32(value)
            self._ok(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4))
        if fp8:
            self.scale = torch.ones(1, device="cuda")
            ptr = vp(self.scale.data_ptr())
            for attr in (DESC_A_SCALE, DESC_B_SCALE):
                self._ok(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(ptr), 8))
        self.layouts = []
        for dtype, rows, cols, ld in ((ab, k, n, k), (ab, k, m, k), (R_16BF, n, m, n)):
            lay = vp()
            self._ok(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, ctypes.c_uint64(rows),
                                                    ctypes.c_uint64(cols), ctypes.c_int64(ld)))
            self.layouts.append(lay)
        pref = vp()
        self._ok(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
        size = ctypes.c_uint64(WORKSPACE)
        self._ok(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, ctypes.byref(size), 8))
        found, count = (_Heuristic * 32)(), ctypes.c_int(0)
        la, lb, lc = self.layouts
        self._ok(lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, la, lb, lc, lc, pref, 32, found,
                                                    ctypes.byref(count)))
        lib.cublasLtMatmulPreferenceDestroy(pref)
        self.algos = [found[i] for i in range(count.value) if found[i].state == 0]
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _ok(status: int) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt status {status}")

    def __call__(self, i: int, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        la, lb, lc = self.layouts
        vp = ctypes.c_void_p
        self._ok(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), vp(w.data_ptr()), la, vp(x.data_ptr()), lb,
            ctypes.byref(self.beta), vp(y.data_ptr()), lc, vp(y.data_ptr()), lc, ctypes.byref(self.algos[i].algo),
            vp(self.ws.data_ptr()), ctypes.c_size_t(WORKSPACE), vp(torch.cuda.current_stream().cuda_stream)))


def main() -> None:
    lib = ctypes.CDLL(f"libcublasLt.so.{torch.version.cuda.split('.')[0]}")  # torch's own, already loaded
    handle = ctypes.c_void_p()
    LtGemm._ok(lib.cublasLtCreate(ctypes.byref(handle)))
    workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
    res: dict = {"machine": machine(), "method": __doc__.split("\n\n")[2].replace("\n", " "), "shapes": [],
                 "per_inference_ms": {}}
    for group, shapes in SHAPES.items():
        m = ROWS[group]
        for name, k, n in shapes:
            for dtype in (torch.bfloat16, torch.float8_e4m3fn):
                fp8 = dtype == torch.float8_e4m3fn
                copies = max(2, min(8, int(200e6 // (n * k * 2))))
                ws = [(torch.randn(n, k, device="cuda") * 0.03).to(dtype) for _ in range(copies)]
                x = torch.randn(m, k, device="cuda").to(dtype)
                y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
                turn = [0]

                def nxt() -> torch.Tensor:
                    turn[0] += 1
                    return ws[turn[0] % copies]

                one = torch.ones((), device="cuda")
                torch_us = graph_time_us(
                    (lambda: torch._scaled_mm(x, nxt().t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
                    if fp8 else (lambda: torch.matmul(x, nxt().t(), out=y)), reps=40, iters=7)
                gemm = LtGemm(lib, handle, m, n, k, fp8, workspace)
                exact = x.float() @ ws[0].float().t()
                candidates = []
                for i in range(len(gemm.algos)):
                    gemm(i, x, ws[0], y)
                    err = float((y.float() - exact).norm() / exact.norm())
                    us = graph_time_us(lambda i=i: gemm(i, x, nxt(), y), reps=40, iters=7)
                    candidates.append({"us": round(us, 2), "rel_err": round(err, 5)})
                best = min((c["us"] for c in candidates if c["rel_err"] < 0.05), default=None)
                row = {"group": group, "name": name, "rows": m, "in": k, "out": n, "dtype": "fp8" if fp8 else "bf16",
                       "torch_us": round(torch_us, 2), "best_lt_us": best, "candidates": candidates,
                       "weight_GBps_torch": round(n * k * (1 if fp8 else 2) / torch_us / 1e3, 1)}
                res["shapes"].append(row)
                key = f"{group}_{row['dtype']}"
                res["per_inference_ms"][key] = round(res["per_inference_ms"].get(key, 0.0)
                                                     + CALLS[group] * torch_us / 1e3, 3)
                print(f"{group:7s} {name:8s} {row['dtype']:5s} torch {torch_us:7.2f} us  best of "
                      f"{len(candidates)} cuBLASLt candidates {best} us", flush=True)
                del ws
                torch.cuda.empty_cache()
    for dt in ("bf16", "fp8"):
        res["per_inference_ms"][f"total_{dt}"] = round(sum(v for k, v in res["per_inference_ms"].items()
                                                           if k.endswith(dt) and not k.startswith("total")), 3)
    print(res["per_inference_ms"])
    print(save("gemm_shapes", res))


if __name__ == "__main__":
    main()
