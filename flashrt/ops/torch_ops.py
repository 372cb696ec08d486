"""Plain-PyTorch versions of every fused op the models call.

These are the reference for the native kernels in csrc/ (same signatures, same semantics) and the
path used on the CPU and wherever `flashrt._kernels` is not built. Each one is written to launch few
kernels, since at batch 1 the launch count, not the arithmetic, sets the time.

Conventions: activations are 2-D [tokens, width] in the model dtype; norms compute their statistics
in float32; residual streams are updated in place. The norms and GeGLU take `quant`: when an FP8
projection reads their output, its static inverse input scale ([1] float32), and they return the
FP8 input of that projection instead (the native kernels write it in the same pass). So do the
decoder attentions, whose output feeds the o projection.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant import INT_MM_MIN_ROWS, quantize_fp8, quantize_per_token, untile_skinny_weight


def _out(y: Tensor, quant: Tensor | None) -> Tensor:
    return y if quant is None else quantize_fp8(y, quant)


def rms_norm(x: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    """x * rsqrt(mean(x^2) + eps). Gemma's (1 + w) scale is folded into the next projection."""
    return _out(F.rms_norm(x, (x.shape[-1],), eps=eps), quant)


def summed(y: Tensor, dtype: torch.dtype) -> Tensor:
    """y, or when it is a GEMM's fp32 split-K partials [splits, rows, n], their sum in `dtype`."""
    return y.sum(0).to(dtype) if y.dim() == 3 else y


def add_rms_norm(x: Tensor, y: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    """x += y (in place; y may be split-K partials, see summed); return rms_norm(x)."""
    x.add_(summed(y, x.dtype))
    return rms_norm(x, eps, quant)


def ada_rms_norm(x: Tensor, scale1p: Tensor, shift: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    """Pi0.5 adaRMSNorm: rms_norm(x) * (1 + scale) + shift, with (1 + scale) precomputed."""
    return _out(torch.addcmul(shift, rms_norm(x, eps), scale1p), quant)


def add_ada_rms_norm(x: Tensor, y: Tensor, gate: Tensor, scale1p: Tensor, shift: Tensor, eps: float,
                     quant: Tensor | None = None) -> Tensor:
    """Pi0.5 gated residual then adaRMSNorm: x += gate * y (in place; y may be split-K partials, see
    summed); return ada_rms_norm(x)."""
    x.addcmul_(summed(y, x.dtype), gate)
    return ada_rms_norm(x, scale1p, shift, eps, quant)


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    return _out(F.layer_norm(x, (x.shape[-1],), w, b, eps), quant)


def add_layer_norm(x: Tensor, y: Tensor, w: Tensor, b: Tensor, eps: float, quant: Tensor | None = None) -> Tensor:
    """SigLIP residual then LayerNorm: x += y (in place); return layer_norm(x)."""
    x.add_(y)
    return layer_norm(x, w, b, eps, quant)


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token INT8 for torch._int_mm: (q int8 [max(T, pad), K], scale float32 [T, 1]); an input of
    fewer than INT_MM_MIN_ROWS rows is zero-padded to 32, as _int_mm needs more than 16."""
    q, scale = quantize_per_token(x)
    if x.shape[0] < INT_MM_MIN_ROWS:
        q = F.pad(q, (0, 0, 0, 32 - x.shape[0]))
    return q, scale


def dequantize_int8(acc: Tensor, scale: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """An INT8 GEMM's int32 output back to the model dtype: acc[:T] * scale (per token) * w_scale (per
    channel) + bias, in float32."""
    out = acc[: scale.shape[0]].float().mul_(scale).mul_(w_scale)
    if bias is not None:
        out = out.add_(bias)
    return out.to(out_dtype)


def gelu_tanh_mul(gate_up: Tensor, quant: Tensor | None = None) -> Tensor:
    """GeGLU on the fused gate/up projection [T, 2M]: gelu_tanh(gate) * up -> [T, M]."""
    m = gate_up.shape[-1] // 2
    return _out(F.gelu(gate_up[:, :m], approximate="tanh").mul_(gate_up[:, m:]), quant)


def gelu_tanh(x: Tensor, quant: Tensor | None = None) -> Tensor:
    """SigLIP's MLP activation, tanh-approximated GELU."""
    return _out(F.gelu(x, approximate="tanh"), quant)


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, k_cache: Tensor, v_cache: Tensor,
             slots: Tensor | None) -> Tensor:
    """Rotary embedding on q and k of a fused QKV projection with one KV head.

    qkv [T, (n_heads + 2) * D]; cos [T, D] = [cos | cos]; sin [T, D] = [-sin | sin] (split-half
    rotation, tables built once). Writes rope(k) and v into rows `slots` of the caches [N, D]
    (rows 0..T-1 when slots is None) and returns rope(q) as [T, n_heads, D].
    """
    t, d = qkv.shape[0], cos.shape[-1]
    heads = qkv.view(t, n_heads + 2, d)
    qk = heads[:, : n_heads + 1]
    # rotate_half(x) = [-x2, x1]; with sin = [-sin | sin] it is roll(x, D/2) * sin.
    rot = torch.addcmul(qk * cos[:, None], torch.roll(qk, d // 2, dims=-1), sin[:, None])
    if slots is None:
        k_cache[:t].copy_(rot[:, n_heads])
        v_cache[:t].copy_(heads[:, n_heads + 1])
    else:
        k_cache.index_copy_(0, slots, rot[:, n_heads])
        v_cache.index_copy_(0, slots, heads[:, n_heads + 1])
    return rot[:, :n_heads]


def attention_sdpa(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_mask: Tensor, quant: Tensor | None = None) -> Tensor:
    """Attention of q [T, H, D] (already scaled by D^-0.5) over one KV head k/v [N, D].

    With a single KV head every query row attends the same keys, so the heads fold into the query
    axis: one single-head attention over T*H rows, no head expansion and no transposes.
    key_mask [N] bool marks the valid keys (prefix padding and unwritten rows are False).
    """
    t, h, d = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(1, 1, t * h, d), k_cache[None, None], v_cache[None, None],
        attn_mask=key_mask[None, None, None, :], scale=1.0)
    return _out(out.view(t, h * d), quant)


def attention_flash_varlen(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_q: Tensor, cu_k: Tensor,
                           max_q: int, max_k: int, quant: Tensor | None = None,
                           fresh_tail: int = -1) -> Tensor:
    """FlashAttention-2 varlen through PyTorch: keys [0, cu_k[1]) and queries [0, cu_q[1]) are valid.

    The valid lengths live on the device (int32 [2] tensors), so one captured graph serves every
    prompt length in its bucket with no mask and no recapture. Rows past cu_q[1] are left unwritten.
    `fresh_tail` (>= 0): only the last fresh_tail valid keys were written by the GPU work just before
    (rope_qkv's rows), so the native kernel may load the keys before them while that work drains;
    it never changes the result, and this reference ignores it.
    """
    t, h, d = q.shape
    out = torch.ops.aten._flash_attention_forward(
        q.reshape(t * h, 1, d), k_cache[:, None], v_cache[:, None], cu_q, cu_k, max_q, max_k,
        0.0, False, False, scale=1.0)[0]
    return _out(out.view(t, h * d), quant)


def linear_accumulate(acc: Tensor, x: Tensor, w: Tensor, b: Tensor) -> None:
    """acc += x @ w.T + b, acc in float32: the flow's Euler update x_t += dt * v with dt folded into w, b."""
    acc.add_(F.linear(x, w, b))


def skinny_gemm_partials(x: Tensor, wt: Tensor, n: int, splits: int, wf: int, ksplit: int) -> Tensor:
    """The split-K partials of x @ w.T in fp32, w given as quant.tile_skinny_weight(w, wf):
    out[s] = x[:, ks s : ks (s + 1)] @ w[:, same].T, ks = k / splits. (ksplit only shapes the kernel.)"""
    rows, k = x.shape
    ks = k // splits
    w = untile_skinny_weight(wt)
    return torch.bmm(x.float().view(rows, splits, ks).transpose(0, 1),
                     w.float().view(n, splits, ks).permute(1, 2, 0))


def attention_mha(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked multi-head attention for SigLIP: q/k/v [B, S, H, D] -> [B * S, H * D]."""
    b, s, h, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b * s, h * d)


@contextmanager
def prefetch_l2():
    """Yields `prefetch(weight)`, which asks for a weight a later GEMM reads to be brought into the
    GPU's L2 cache early (the native version). A hint that changes no result; PyTorch has no such
    op, so here it does nothing."""
    yield lambda weight: None
