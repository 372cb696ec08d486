"""Quantized linears: FP8 (E4M3) for Thor, RTX and Hopper, INT8 W8A8 for Orin.

Weights are quantized once at load: one scale per output channel (INT8, FP8 on request) or per
tensor (FP8's default). Activations:
- FP8: a static per-tensor scale from calibration (amax seen on calibration observations / 448),
  applied by the kernel that produces the input (a norm, GeGLU, the decoder attention; `fp8_input`
  gives it the scale), or else by `ops.quantize_fp8`; the GEMM is `torch._scaled_mm` with the scales in its epilogue.
- INT8: a per-token scale computed on the fly (amax of the row / 127), so no calibration is needed;
  `ops.quantize_int8` (one kernel), `torch._int_mm` (int32 accumulation, runs on sm_87), then
  `ops.dequantize_int8` (one kernel).

Models call `linear(x, w, b, ops)` for every large projection; `w` is a plain tensor (bf16/fp32
path), a `QuantWeight`, or a `Recorder` (calibration); `ops` is the engine's op set (native kernels
or their torch references; the references when omitted). Quantizing a model swaps its weight
attributes in place (see `PiModel.linears`), so the model code is the same for every precision.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT_MM_MIN_ROWS = 17  # torch._int_mm needs more than 16 rows: smaller inputs are zero-padded to 32

# Projections each precision leaves in bf16 unless `calibration.keep_bf16` says otherwise. FP8's
# 3-bit mantissa in SigLIP's q/k/v and output projections reaches the attention logits, and the
# softmax amplifies it through 27 layers: on random full-size Pi0 weights (3 cameras, 20
# observations) they alone take the action chunk's worst cosine to bf16 from 0.989 to 0.9955 (all of
# SigLIP in bf16: 0.9964; its MLPs alone: no change) for ~0.05 ms. INT8's per-token scales need none.
KEEP_BF16 = {"fp8": ("vision.*.qkv", "vision.*.o"), "int8": ()}


def linear(x: Tensor, w, b: Tensor | None = None, ops=None) -> Tensor:
    if isinstance(w, Tensor):
        return F.linear(x, w, b)
    return w(x, b, ops)


def quantize_weight(w: Tensor, kind: str, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of w [out, in] -> (q, scale float32): one scale per output channel
    (scale [out]), or one for the whole tensor (scale [1])."""
    w = w.float()
    qmax = FP8_MAX if kind == "fp8" else INT8_MAX
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = amax.clamp(min=1e-12) / qmax
    x = w / scale[:, None]
    q = x.clamp(-FP8_MAX, FP8_MAX).to(FP8) if kind == "fp8" else x.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[:, None]


def quantize_fp8(x: Tensor, inv_scale: Tensor) -> Tensor:
    """x * (1 / scale), saturated to the E4M3 range (an outlier beyond calibration clips, never NaNs)."""
    return (x * inv_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def streamed(w) -> Tensor:
    """The tensor a projection's GEMM reads its weights from, whatever form `linear` is given: the
    weight, a quantized weight's values, a skinny weight's tiles, or the weight a calibration
    recorder multiplies by."""
    if isinstance(w, Tensor):
        return w
    if isinstance(w, SkinnyWeight):
        return w.tiled
    return w.q if isinstance(w, QuantWeight) else w.weight


# w [n, k] as (n / 16 wf, wf, 2, 8, k / 16, 2, 4, 2) = (tile, warp, row half, row, k step, k half, lane
# column, pair), reordered so that per tile and k step each warp's 16 x 16 piece is in mma.sync
# A-fragment order (lane = row * 4 + column, its 8 values contiguous): one CTA's slice of the
# skinny GEMM is then one contiguous block (csrc/skinny_gemm.cu).
_SKINNY_ORDER = (0, 4, 1, 3, 6, 5, 2, 7)


def tile_skinny_weight(w: Tensor, wf: int) -> Tensor:
    """w [n, k] laid out for the skinny GEMM with 16 wf output features per CTA (once, at load)."""
    n, k = w.shape
    if n % (16 * wf) or k % 16:
        raise ValueError(f"tile_skinny_weight: a [{n}, {k}] weight does not tile by {16 * wf} x 16")
    return w.view(n // (16 * wf), wf, 2, 8, k // 16, 2, 4, 2).permute(*_SKINNY_ORDER).contiguous()


def untile_skinny_weight(tiled: Tensor) -> Tensor:
    """The [n, k] weight back from tile_skinny_weight's layout (a view-and-copy, for the torch ops)."""
    t, ks, wf = tiled.shape[:3]
    inverse = [_SKINNY_ORDER.index(d) for d in range(8)]
    return tiled.permute(*inverse).reshape(t * wf * 16, ks * 16)


@dataclass(eq=False)
class SkinnyWeight:
    """A bf16 weight of the action expert tiled at load for the split-K few-row GEMM
    (csrc/skinny_gemm.cu, Platform.skinny_gemm): `linear` returns its fp32 split-K partials
    [splits, rows, out], which the norm after it sums (ops.add_rms_norm / add_ada_rms_norm take
    them as y). Only the tiles are kept: the torch reference untiles them on each call."""

    tiled: Tensor  # tile_skinny_weight(weight, wf)
    splits: int
    ksplit: int

    @property
    def shape(self) -> tuple[int, int]:
        t, ks, wf = self.tiled.shape[:3]
        return t * wf * 16, ks * 16

    def __call__(self, x: Tensor, b: Tensor | None = None, ops=None) -> Tensor:
        assert b is None, "skinny weights have no bias"
        if not hasattr(ops, "skinny_gemm_partials"):  # ops without the kernel: the torch reference
            from .ops import torch_ops as ops
        wf = self.tiled.shape[2]
        return ops.skinny_gemm_partials(x, self.tiled, self.shape[0], self.splits, wf, self.ksplit)


def fp8_input(w) -> Tensor | None:
    """The static inverse input scale of an FP8 projection, for the op that produces its input to
    write FP8 directly (see ops.torch_ops); None for a projection that takes its input as it is."""
    return w.inv_act_scale if isinstance(w, QuantWeight) and w.kind == "fp8" else None


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """INT8 per row: (q int8 [M, K], scale float32 [M, 1]) with x ~= q * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / INT8_MAX
    return (x / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


@dataclass(eq=False)
class QuantWeight:
    kind: str  # fp8 | int8
    q: Tensor  # [out, in]
    w_scale: Tensor  # [1, out] float32 per output channel, or a 0-dim tensor-wide scale (fp8 only)
    bias: Tensor | None  # [out] in the output dtype
    out_dtype: torch.dtype
    act_scale: Tensor | None = None  # fp8: 0-dim float32 static per-tensor scale
    inv_act_scale: Tensor | None = None  # its reciprocal, [1] (so x * it promotes to float32), computed once
    _rows: dict = field(default_factory=dict)  # fp8: per-row copies of act_scale for each input height

    @classmethod
    def make(cls, w: Tensor, b: Tensor | None, kind: str, act_amax: float | None,
             per_channel: bool = True) -> "QuantWeight":
        """FP8 with `per_channel=False` takes one weight scale per tensor: then both scales are
        tensor-wide and the GEMM is cuBLASLt's own FP8 path with the bias in its epilogue, ~25%
        faster on the H100 than the row-wise-scaled kernel a per-channel scale needs."""
        per_channel = per_channel or kind != "fp8"  # INT8 dequantizes per channel anyway
        q, s = quantize_weight(w, kind, per_channel)
        act = inv = None
        if kind == "fp8":
            if act_amax is None:
                raise ValueError("FP8 needs a calibrated activation amax")
            act = torch.tensor(max(act_amax, 1e-6) / FP8_MAX, device=w.device)
            inv = (1.0 / act).reshape(1)
        return cls(kind, q, s[None, :].contiguous() if per_channel else s.reshape(()), b, w.dtype, act, inv)

    def __call__(self, x: Tensor, b: Tensor | None = None, ops=None) -> Tensor:
        if ops is None:
            from .ops import torch_ops as ops  # (ops.torch_ops imports this module)
        bias = self.bias if b is None else b
        if self.kind == "fp8":
            xq = x if x.dtype == FP8 else ops.quantize_fp8(x, self.inv_act_scale)  # FP8: its producer quantized it
            if self.w_scale.dim() == 0:  # tensor-wide scales: cuBLASLt, the bias in its epilogue
                return torch._scaled_mm(xq, self.q.t(), scale_a=self.act_scale, scale_b=self.w_scale, bias=bias,
                                        out_dtype=self.out_dtype)
            m = x.shape[0]
            scale_a = self._rows.get(m)
            if scale_a is None:  # made once per input height (during warm-up, before capture)
                scale_a = self._rows[m] = self.act_scale.reshape(1, 1).repeat(m, 1)
            out = torch._scaled_mm(xq, self.q.t(), scale_a=scale_a, scale_b=self.w_scale, out_dtype=self.out_dtype)
            return out.add_(bias) if bias is not None else out  # rowwise-scaled GEMMs take no bias
        xq, sx = ops.quantize_int8(x)  # zero rows appended below INT_MM_MIN_ROWS
        return ops.dequantize_int8(torch._int_mm(xq, self.q.t()), sx, self.w_scale, bias, self.out_dtype)


@dataclass(eq=False)
class Recorder:
    """Calibration: runs the plain linear and records the largest |x| it has seen in the valid rows."""

    weight: Tensor
    amax: Tensor  # [1] float32 on the device, updated in place (no host sync while running)
    # [1] int64 on the device: rows at or past it are padding and are not recorded (the prefix's
    # bucket padding holds whatever the attention left unwritten there, NaN included); None: all rows.
    valid_rows: Tensor | None = None

    def __call__(self, x: Tensor, b: Tensor | None = None, ops=None) -> Tensor:
        a = x.abs()
        if self.valid_rows is not None:
            a = torch.where(torch.arange(x.shape[0], device=x.device)[:, None] < self.valid_rows, a, 0)
        torch.maximum(self.amax, a.amax().float(), out=self.amax)
        return F.linear(x, self.weight, b)


# ---------------------------------------------------------------------------------------------
# Calibration cache


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHRT_CACHE", Path.home() / ".cache" / "flashrt")) / "calibration"


def cache_key(**parts) -> str:
    """A stable key over everything that changes the activation ranges: the checkpoint (path or Hub id
    and revision, plus the weights file's size and mtime), the model settings and the platform."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_cached(key: str) -> dict | None:
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(key: str, data: dict) -> Path:
    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path
