"""The fused ops on FlashRT's own CUDA kernels (`flashrt._kernels`, built from csrc/).

Each function here has the signature and semantics of its PyTorch reference (`torch_ops`, and
`preprocess.images_to_model`): same arguments, same in-place updates of the residual stream and of
the KV caches, same return values and dtypes. It checks its arguments, passes raw device pointers,
sizes and the current CUDA stream to the kernel, and falls back to the reference for whatever a
kernel does not cover (a CPU tensor, an unsupported dtype or layout), so it is always safe to call.
Nothing here synchronizes with the host or reads a device value on the host: valid lengths stay in
device tensors, so the kernels capture into CUDA graphs. Outputs are allocated with torch.empty
(the caching allocator, which graph capture supports).

What the kernels require (otherwise the torch op runs):
- dtypes: bf16, fp16 and fp32 (attention: bf16 and fp16); all tensors of an op in one dtype, except
  `linear_accumulate`'s fp32 accumulator and `images_to_model`'s uint8 images.
- 2-D activations [rows, width] with unit column stride, 16-byte aligned rows (width and row
  stride multiples of 8 elements in bf16/fp16, 4 in fp32); 1-D vectors (norm weights, adaRMS
  modulation rows, gate) contiguous. Row views of larger tensors are fine.
- rope_qkv: qkv [T, (H + 2) * D] rows (the fused QKV GEMM output), cos/sin [T, D] rows, caches
  [N, D] with unit column stride (row slices of the [depth, N, D] cache), slots int64 [T] or None.
- attention: head dim 256, query rows T * H <= the platform's `native_attention_rows` (the
  denoising steps' 400 rows, Pi0's 8 state-token rows); larger query counts (the prefix) run
  torch's FlashAttention / SDPA.
"""

from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import preprocess
from ..quant import FP8, INT_MM_MIN_ROWS
from . import torch_ops

try:  # the module exists only where csrc/ was compiled
    from .. import _kernels
except ImportError:  # pragma: no cover - exercised by the CPU test suite without nvcc
    _kernels = None

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_RES_NONE, _RES_ADD, _RES_GATED = 0, 1, 2
HEAD_DIM = 256  # the split-K attention kernel's head dim
# Split-K attention launch shape (swept with benchmarks/kernels.py on the H100: 4 warps per CTA
# beat 1 and 2 at every shape; 8-16 splits of the ~760 keys were best): warps per CTA (16 query
# rows each), the smallest key slice one CTA takes, how many CTAs per SM to aim for, and the
# kernel's limit on splits.
ATTN_WARPS = 4
KEYS_PER_SPLIT = 64
CTAS_PER_SM = 2
MAX_SPLITS = 32


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output allocation (the GPU tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def available() -> bool:
    """True when flashrt._kernels is importable (built for some GPU)."""
    return _kernels is not None


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _vec(t: Tensor) -> int:
    return 16 // t.element_size()


def _rows_ok(t: Tensor, code_dtype: torch.dtype | None = None) -> bool:
    """2-D CUDA tensor of a kernel dtype, unit column stride, 16-byte aligned rows."""
    if t.dim() != 2 or not t.is_cuda or t.dtype not in _CODES:
        return False
    if code_dtype is not None and t.dtype != code_dtype:
        return False
    v = _vec(t)
    return (t.shape[1] % v == 0 and (t.stride(1) == 1 or t.shape[1] <= 1) and t.stride(0) % v == 0
            and t.data_ptr() % 16 == 0)


def _vector_ok(t: Tensor, n: int, dtype: torch.dtype) -> bool:
    return (t.dim() == 1 and t.shape[0] == n and t.dtype == dtype and t.is_cuda
            and (t.stride(0) == 1 or n <= 1) and t.data_ptr() % 16 == 0)


# ---------------------------------------------------------------------------------------------
# Norms (one kernel: residual add or gated residual, RMS or LayerNorm, optional affine)


def _norm(x: Tensor, y: Tensor | None, gate: Tensor | None, scale: Tensor | None, shift: Tensor | None,
          eps: float, residual: int, layer_norm: bool, quant: Tensor | None) -> Tensor:
    out = _empty(x.shape, x.dtype if quant is None else FP8, x.device)
    parts = y is not None and y.dim() == 3  # a GEMM's split-K partials [splits, rows, width], fp32
    _kernels.norm(_CODES[x.dtype], x.data_ptr(), x.stride(0), 0 if y is None else y.data_ptr(),
                  0 if y is None else y.stride(-2), y.shape[0] if parts else 0, y.stride(0) if parts else 0,
                  0 if gate is None else gate.data_ptr(),
                  0 if scale is None else scale.data_ptr(), 0 if shift is None else shift.data_ptr(),
                  out.data_ptr(), out.stride(0), x.shape[0], x.shape[1], float(eps), residual, layer_norm,
                  0 if quant is None else quant.data_ptr(), _stream(x))
    return out


def _quant_ok(x: Tensor, quant: Tensor | None) -> bool:
    """FP8 output: bf16/fp16 input, the inverse scale a float32 [1] tensor on the same GPU."""
    return quant is None or (x.dtype in (torch.bfloat16, torch.float16) and quant.dtype == torch.float32
                             and quant.numel() == 1 and quant.device == x.device)


def _norm_args_ok(x: Tensor, y: Tensor | None = None, *vectors: Tensor, quant: Tensor | None = None) -> bool:
    if not _rows_ok(x) or x.shape[1] == 0 or x.shape[1] // _vec(x) > 4096 or not _quant_ok(x, quant):
        return False
    if y is not None and y.dim() == 3:  # split-K partials: fp32, contiguous rows of x's shape
        if not (y.dtype == torch.float32 and y.shape[1:] == x.shape and y.is_contiguous()
                and y.device == x.device and y.data_ptr() % 16 == 0):
            return False
    elif y is not None and (not _rows_ok(y, x.dtype) or y.shape != x.shape or y.device != x.device):
        return False
    return all(_vector_ok(v, x.shape[1], x.dtype) and v.device == x.device for v in vectors)


def rms_norm(x: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    if not _norm_args_ok(x, quant=quant):
        return torch_ops.rms_norm(x, eps, quant)
    return _norm(x, None, None, None, None, eps, _RES_NONE, False, quant)


def add_rms_norm(x: Tensor, y: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    if not _norm_args_ok(x, y, quant=quant):
        return torch_ops.add_rms_norm(x, y, eps, quant)
    return _norm(x, y, None, None, None, eps, _RES_ADD, False, quant)


def ada_rms_norm(x: Tensor, scale1p: Tensor, shift: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    if not _norm_args_ok(x, None, scale1p, shift, quant=quant):
        return torch_ops.ada_rms_norm(x, scale1p, shift, eps, quant)
    return _norm(x, None, None, scale1p, shift, eps, _RES_NONE, False, quant)


def add_ada_rms_norm(x: Tensor, y: Tensor, gate: Tensor, scale1p: Tensor, shift: Tensor, eps: float,
                     quant: Tensor | None = None) -> Tensor:
    if not _norm_args_ok(x, y, gate, scale1p, shift, quant=quant):
        return torch_ops.add_ada_rms_norm(x, y, gate, scale1p, shift, eps, quant)
    return _norm(x, y, gate, scale1p, shift, eps, _RES_GATED, False, quant)


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    if w is None or b is None or not _norm_args_ok(x, None, w, b, quant=quant):
        return torch_ops.layer_norm(x, w, b, eps, quant)
    return _norm(x, None, None, w, b, eps, _RES_NONE, True, quant)


def add_layer_norm(x: Tensor, y: Tensor, w: Tensor, b: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    if w is None or b is None or not _norm_args_ok(x, y, w, b, quant=quant):
        return torch_ops.add_layer_norm(x, y, w, b, eps, quant)
    return _norm(x, y, None, w, b, eps, _RES_ADD, True, quant)


# ---------------------------------------------------------------------------------------------
# GeGLU, RoPE + KV-cache write, Euler update


def _gelu_tanh(x: Tensor, gated: bool, quant: Tensor | None) -> Tensor | None:
    """The kernel, or None when the torch op must run."""
    parts = 2 if gated else 1  # [gate | up] or x alone
    if not _rows_ok(x) or x.shape[1] % (parts * _vec(x)) != 0 or not _quant_ok(x, quant):
        return None
    t, m = x.shape[0], x.shape[1] // parts
    out = _empty((t, m), x.dtype if quant is None else FP8, x.device)
    _kernels.gelu_tanh(_CODES[x.dtype], x.data_ptr(), x.stride(0), out.data_ptr(), t, m, gated,
                       0 if quant is None else quant.data_ptr(), _stream(x))
    return out


def gelu_tanh_mul(gate_up: Tensor, quant: Tensor | None = None) -> Tensor:
    out = _gelu_tanh(gate_up, True, quant)
    return torch_ops.gelu_tanh_mul(gate_up, quant) if out is None else out


def gelu_tanh(x: Tensor, quant: Tensor | None = None) -> Tensor:
    out = _gelu_tanh(x, False, quant)
    return torch_ops.gelu_tanh(x, quant) if out is None else out


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    if not _rows_ok(x) or x.shape[1] % 8 != 0:
        return torch_ops.quantize_int8(x)
    t, k = x.shape
    rows_out = t if t >= INT_MM_MIN_ROWS else 32
    q = _empty((rows_out, k), torch.int8, x.device)
    scale = _empty((t, 1), torch.float32, x.device)
    _kernels.quantize_int8(_CODES[x.dtype], x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), t, rows_out, k,
                           _stream(x))
    return q, scale


def dequantize_int8(acc: Tensor, scale: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    t, n = scale.shape[0], acc.shape[1]
    ok = (acc.is_cuda and acc.dtype == torch.int32 and acc.dim() == 2 and acc.stride(1) == 1 and acc.stride(0) % 4 == 0
          and n % 4 == 0 and acc.shape[0] >= t and out_dtype in _CODES
          and scale.dtype == torch.float32 and scale.is_contiguous() and scale.numel() == t
          and w_scale.dtype == torch.float32 and w_scale.is_contiguous() and w_scale.numel() == n
          and (bias is None or (bias.dtype == out_dtype and bias.is_contiguous() and bias.numel() == n)))
    if not ok:
        return torch_ops.dequantize_int8(acc, scale, w_scale, bias, out_dtype)
    out = _empty((t, n), out_dtype, acc.device)
    _kernels.dequantize_int8(_CODES[out_dtype], acc.data_ptr(), acc.stride(0), scale.data_ptr(), w_scale.data_ptr(),
                             0 if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), t, n, _stream(acc))
    return out


def quantize_fp8(x: Tensor, inv_scale: Tensor) -> Tensor:
    if not _rows_ok(x) or not _quant_ok(x, inv_scale) or x.shape[1] % 8 != 0:
        return torch_ops.quantize_fp8(x, inv_scale)
    out = _empty(x.shape, FP8, x.device)
    _kernels.quantize_fp8(_CODES[x.dtype], x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0], x.shape[1],
                          inv_scale.data_ptr(), _stream(x))
    return out


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, k_cache: Tensor, v_cache: Tensor,
             slots: Tensor | None) -> Tensor:
    t, d = qkv.shape[0], cos.shape[-1]
    ok = (_rows_ok(qkv) and qkv.shape[1] == (n_heads + 2) * d and d % (2 * _vec(qkv)) == 0
          and all(_rows_ok(a, qkv.dtype) and a.device == qkv.device for a in (cos, sin, k_cache, v_cache))
          and cos.shape == (t, d) and sin.shape == (t, d) and k_cache.shape[1] == d and v_cache.shape[1] == d
          and (slots is not None or k_cache.shape[0] >= t and v_cache.shape[0] >= t)
          and (slots is None or (slots.dtype == torch.int64 and slots.shape == (t,) and slots.device == qkv.device
                                 and slots.is_contiguous())))
    if not ok:
        return torch_ops.rope_qkv(qkv, cos, sin, n_heads, k_cache, v_cache, slots)
    q = _empty((t, n_heads, d), qkv.dtype, qkv.device)
    _kernels.rope_qkv(_CODES[qkv.dtype], qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), cos.stride(0),
                      sin.data_ptr(), sin.stride(0), t, n_heads, d, q.data_ptr(), k_cache.data_ptr(),
                      k_cache.stride(0), v_cache.data_ptr(), v_cache.stride(0),
                      0 if slots is None else slots.data_ptr(), _stream(qkv))
    return q


def linear_accumulate(acc: Tensor, x: Tensor, w: Tensor, b: Tensor) -> None:
    ok = (acc.dim() == 2 and acc.is_cuda and acc.dtype == torch.float32 and acc.stride(1) == 1
          and _rows_ok(x) and _rows_ok(w, x.dtype) and x.shape[0] == acc.shape[0] and w.shape[0] == acc.shape[1]
          and w.shape[1] == x.shape[1] and acc.device == x.device == w.device
          and (b is None or (b.dim() == 1 and b.shape[0] == w.shape[0] and b.dtype == x.dtype
                             and b.is_contiguous() and b.device == x.device)))
    if not ok:
        return torch_ops.linear_accumulate(acc, x, w, b)
    _kernels.linear_accumulate(_CODES[x.dtype], acc.data_ptr(), acc.stride(0), x.data_ptr(), x.stride(0),
                               w.data_ptr(), w.stride(0), 0 if b is None else b.data_ptr(), acc.shape[0],
                               acc.shape[1], x.shape[1], _stream(acc))
    return None


# ---------------------------------------------------------------------------------------------
# Split-K GEMM for the action expert's few rows (csrc/skinny_gemm.cu; Platform.skinny_gemm)


def skinny_gemm_partials(x: Tensor, wt: Tensor, n: int, splits: int, wf: int, ksplit: int) -> Tensor:
    """The split-K partials [splits, rows, n] (fp32) of x @ w.T, wt = quant.tile_skinny_weight(w, wf), as
    torch_ops.skinny_gemm_partials. The kernel's own checks raise ValueError."""
    rows, k = x.shape
    if not (_rows_ok(x, torch.bfloat16) and wt.is_contiguous() and wt.numel() == n * k and wt.dtype == x.dtype
            and wt.device == x.device):
        raise ValueError("skinny_gemm_partials: x must be bf16 [rows, k] on the GPU with 16-byte aligned "
                         "rows, wt the contiguous quant.tile_skinny_weight of a [n, k] weight on its device")
    part = _empty((splits, rows, n), torch.float32, x.device)
    _kernels.skinny_gemm_partials(_CODES[x.dtype], x.data_ptr(), x.stride(0), wt.data_ptr(), rows, k, n,
                                  splits, wf, ksplit, part.data_ptr(), _stream(x))
    return part


# ---------------------------------------------------------------------------------------------
# Attention: split-K kernel for few query rows against the one-head KV cache


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_splits(rows: int, n_keys: int, device: torch.device, warps: int = ATTN_WARPS,
                     keys_per_split: int = KEYS_PER_SPLIT, ctas_per_sm: int = CTAS_PER_SM) -> int:
    """How many CTAs share the keys of one query tile (16 x warps rows): enough to give every SM
    about `ctas_per_sm` CTAs, but at least `keys_per_split` keys each."""
    tiles = math.ceil(rows / (16 * warps))
    want = math.ceil(ctas_per_sm * _sm_count(device.index or 0) / tiles)
    return max(1, min(want, math.ceil(n_keys / keys_per_split), MAX_SPLITS))


def attention_decode(q2: Tensor, k_cache: Tensor, v_cache: Tensor, cu_q: Tensor | None, cu_k: Tensor | None,
                     key_mask: Tensor | None, splits: int | None = None, warps: int = ATTN_WARPS,
                     quant: Tensor | None = None, fresh_tail: int = -1) -> Tensor:
    """The kernel on q2 [R, 256] (rows = tokens x heads): returns [R, 256], FP8 with `quant`. Callers
    check the layout."""
    rows, n_keys = q2.shape[0], k_cache.shape[0]
    if splits is None:
        splits = attention_splits(rows, n_keys, q2.device, warps)
    out = _empty((rows, HEAD_DIM), q2.dtype if quant is None else FP8, q2.device)
    part_o = part_ml = None
    if splits > 1:
        part_o = _empty((splits, rows, HEAD_DIM), torch.float32, q2.device)
        part_ml = _empty((splits, rows, 2), torch.float32, q2.device)
    _kernels.attention_decode(
        _CODES[q2.dtype], q2.data_ptr(), q2.stride(0), k_cache.data_ptr(), k_cache.stride(0), v_cache.data_ptr(),
        v_cache.stride(0), out.data_ptr(), out.stride(0), rows, n_keys, 0 if cu_q is None else cu_q.data_ptr(),
        0 if cu_k is None else cu_k.data_ptr(), 0 if key_mask is None else key_mask.data_ptr(), warps, splits,
        0 if part_o is None else part_o.data_ptr(), 0 if part_ml is None else part_ml.data_ptr(),
        0 if quant is None else quant.data_ptr(), fresh_tail, _stream(q2))
    return out


def _fp8_out(out: Tensor, quant: Tensor | None) -> Tensor:
    return out if quant is None else quantize_fp8(out, quant)


def _attention_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, max_rows: int) -> Tensor | None:
    """q as [T * H, 256] rows for the kernel, or None when the torch op must run."""
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16) or not q.is_cuda:
        return None
    t, h, d = q.shape
    if d != HEAD_DIM or t * h > max_rows or t * h == 0:
        return None
    if not all(_rows_ok(a, q.dtype) and a.shape[1] == d and a.device == q.device for a in (k_cache, v_cache)):
        return None
    q2 = q.reshape(t * h, d)
    if not _rows_ok(q2):
        q2 = q2.contiguous()
    return q2


def _int32_pair_ok(t: Tensor | None, device: torch.device) -> bool:
    return t is not None and t.dtype == torch.int32 and t.device == device and t.numel() >= 2 and t.is_contiguous()


def make_attention_flash_varlen(max_rows: int):
    def attention_flash_varlen(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_q: Tensor, cu_k: Tensor,
                               max_q: int, max_k: int, quant: Tensor | None = None,
                               fresh_tail: int = -1) -> Tensor:
        q2 = _attention_args(q, k_cache, v_cache, max_rows)
        if q2 is None or not (_int32_pair_ok(cu_q, q.device) and _int32_pair_ok(cu_k, q.device)) \
                or not _quant_ok(q, quant):  # torch's attention (the prefix), then our one-kernel quantization
            return _fp8_out(torch_ops.attention_flash_varlen(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k), quant)
        t, h, d = q.shape
        return attention_decode(q2, k_cache, v_cache, cu_q, cu_k, None, quant=quant,
                                fresh_tail=fresh_tail).view(t, h * d)

    attention_flash_varlen.__doc__ = torch_ops.attention_flash_varlen.__doc__
    return attention_flash_varlen


def make_attention_sdpa(max_rows: int):
    def attention_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_mask: Tensor, quant: Tensor | None = None) -> Tensor:
        q2 = _attention_args(q, k_cache, v_cache, max_rows)
        ok = (key_mask is not None and key_mask.dtype == torch.bool and key_mask.dim() == 1
              and key_mask.shape[0] == k_cache.shape[0] and key_mask.is_contiguous() and key_mask.device == q.device)
        if q2 is None or not ok or not _quant_ok(q, quant):
            return _fp8_out(torch_ops.attention_sdpa(q, k_cache, v_cache, key_mask), quant)
        t, h, d = q.shape
        return attention_decode(q2, k_cache, v_cache, None, None, key_mask, quant=quant).view(t, h * d)

    attention_sdpa.__doc__ = torch_ops.attention_sdpa.__doc__
    return attention_sdpa


# ---------------------------------------------------------------------------------------------
# L2 prefetch of the weights a later GEMM reads, on a side stream

_side = threading.local()  # one prefetch stream per thread and device: two captures never share one


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if not hasattr(_side, "streams"):
        _side.streams = {}
    if device not in _side.streams:
        _side.streams[device] = torch.cuda.Stream(device)
    return _side.streams[device]


@contextmanager
def prefetch_l2():
    """Yields `prefetch(weight)`: from the point where it is called on the current stream, a side
    stream launches one kernel that prefetches the weight's bytes into L2 (csrc/elementwise.cu),
    and the current stream goes on without waiting for it. Leaving the block joins the side stream
    back (under CUDA graph capture: a branch of the graph that only the block's end depends on). A
    hint: a tensor that is not contiguous, not on a GPU or not 16-byte aligned is skipped."""
    main = side = None

    def prefetch(w: Tensor) -> None:
        nonlocal main, side
        if not (w.is_cuda and w.is_contiguous() and w.data_ptr() % 16 == 0):
            return
        if side is None:
            main, side = torch.cuda.current_stream(w.device), _side_stream(w.device)
        side.wait_stream(main)
        _kernels.l2_prefetch(w.data_ptr(), w.numel() * w.element_size() // 16 * 16, side.cuda_stream)

    try:
        yield prefetch
    finally:
        if side is not None:
            main.wait_stream(side)


# ---------------------------------------------------------------------------------------------
# Image preprocessing: every camera in one launch


def images_to_model(images: list[Tensor | None], out: Tensor) -> None:
    """images[i]: uint8 [H_i, W_i, 3] on the device, or None (slot i left as it is); out [C, 3, S, S]."""
    ok = (out.dim() == 4 and out.shape[1] == 3 and out.shape[2] == out.shape[3] and out.is_cuda
          and out.dtype in _CODES and out.is_contiguous() and len(images) <= out.shape[0])
    cams, keep = [], []
    size = out.shape[-1] if out.dim() == 4 else 0
    for i, img in enumerate(images if ok else ()):
        if img is None:
            continue
        if (img.dtype != torch.uint8 or img.dim() != 3 or img.shape[2] != 3 or img.device != out.device
                or img.shape[0] == 0 or img.shape[1] == 0):
            ok = False
            break
        if not img.is_contiguous():
            img = img.contiguous()
        keep.append(img)
        h, w = img.shape[0], img.shape[1]
        nh, nw, top, left = preprocess.resize_with_pad_geometry(h, w, size)
        if nh < 1 or nw < 1:
            ok = False
            break
        cams.append((img.data_ptr(), h, w, nh, nw, top, left, i))
    if not ok:
        return preprocess.images_to_model(images, out)
    if cams:
        _kernels.images_to_model(_CODES[out.dtype], cams, out.data_ptr(), size, _stream(out))
    return None


# ---------------------------------------------------------------------------------------------


def native_ops(platform) -> dict:
    """The ops with a native version, for `flashrt.ops.for_platform` (platform.native_kernels)."""
    if _kernels is None:
        raise RuntimeError("flashrt._kernels is not built; the platform must not ask for native kernels")
    rows = getattr(platform, "native_attention_rows", 0)
    ops = {
        "rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "ada_rms_norm": ada_rms_norm,
        "add_ada_rms_norm": add_ada_rms_norm, "layer_norm": layer_norm, "add_layer_norm": add_layer_norm,
        "gelu_tanh_mul": gelu_tanh_mul, "gelu_tanh": gelu_tanh, "rope_qkv": rope_qkv, "linear_accumulate": linear_accumulate,
        "images_to_model": images_to_model, "quantize_fp8": quantize_fp8, "quantize_int8": quantize_int8,
        "dequantize_int8": dequantize_int8,
    }
    if getattr(platform, "l2_prefetch", False):
        ops["prefetch_l2"] = prefetch_l2
    if getattr(platform, "skinny_gemm", False):
        ops["skinny_gemm_partials"] = skinny_gemm_partials
    if rows > 0:
        ops["attention_flash_varlen"] = make_attention_flash_varlen(rows)
        ops["attention_sdpa"] = make_attention_sdpa(rows)
    return ops
