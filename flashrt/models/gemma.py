"""Gemma decoder layers for the PaliGemma prefix and the action expert, sharing one KV cache.

Pi0's two stacks (Gemma 2B on the prefix, Gemma 300M on the suffix) attend jointly layer by layer.
At inference the prefix runs once and leaves its per-layer K/V in a cache; each denoising step runs
the expert on the suffix, writes the suffix K/V right after the valid prefix rows and attends over
both. Prefix and suffix tokens are compact (masked tokens dropped), so positions equal cache rows
and a key range [0, n) is the whole mask.

Prepared weights: Q/K/V fused into one matrix with the 1/sqrt(head_dim) query scale folded in;
gate/up fused; Gemma's RMSNorm `(1 + w)` folded into the projection that follows it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..quant import SkinnyWeight, fp8_input, linear, streamed, tile_skinny_weight

from .layout import GemmaDims

EPS = 1e-6
ROPE_THETA = 10_000.0


@dataclass
class GemmaLayer:  # each a weight tensor, or its quantized form (quant.QuantWeight)
    qkv: Tensor  # [(heads + 2) * head_dim, width]
    o: Tensor  # [width, heads * head_dim]
    gate_up: Tensor  # [2 * mlp, width]
    down: Tensor  # [width, mlp]

    LINEARS = ("qkv", "o", "gate_up", "down")


SKINNY_MAX_ROWS = 56  # csrc/skinny_gemm.cu: 7 n8 tiles


def tile_skinny(ops, layers: list[GemmaLayer], rows: int, splits: int = 8, wf: int = 4,
                ksplit: int = 2) -> None:
    """The expert's o and down projections as SkinnyWeights where `ops` has the kernel
    (Platform.skinny_gemm): their GEMMs leave split-K partials that the residual norms after them sum
    (csrc/README.md, "Skinny GEMM"). Both have 1024 outputs, so a split of their inputs is what fills
    the GPU. qkv and gate_up stay on cuBLAS: through it, each made the model slower."""
    def fits(w: Tensor) -> bool:  # the kernel's shapes (a model of other sizes keeps cuBLAS)
        n, k = w.shape
        ks = k // splits
        return (w.dtype == torch.bfloat16 and n % (16 * wf) == 0 and k % splits == 0 and ks % 64 == 0
                and 64 * ksplit <= ks <= 1024)

    if not hasattr(ops, "skinny_gemm_partials") or rows > SKINNY_MAX_ROWS:
        return
    for L in layers:
        for name in ("o", "down"):
            w = getattr(L, name)
            if fits(w):
                setattr(L, name, SkinnyWeight(tile_skinny_weight(w, wf), splits, ksplit))


def load_layers(dims: GemmaDims, prefix: str, get: Callable[[str], Tensor], cast: Callable[[Tensor], Tensor],
                fold_norms: bool) -> list[GemmaLayer]:
    """Fused layers; with `fold_norms` the RMSNorm weights are folded in (plain Gemma norms)."""
    layers = []
    for n in range(dims.depth):
        p = f"{prefix}.layers.{n}"
        qkv = torch.cat([get(f"{p}.self_attn.q_proj.weight") * dims.head_dim**-0.5,
                         get(f"{p}.self_attn.k_proj.weight"), get(f"{p}.self_attn.v_proj.weight")])
        gate_up = torch.cat([get(f"{p}.mlp.gate_proj.weight"), get(f"{p}.mlp.up_proj.weight")])
        if fold_norms:
            qkv = qkv * (1 + get(f"{p}.input_layernorm.weight"))
            gate_up = gate_up * (1 + get(f"{p}.post_attention_layernorm.weight"))
        layers.append(GemmaLayer(cast(qkv), cast(get(f"{p}.self_attn.o_proj.weight")), cast(gate_up),
                                 cast(get(f"{p}.mlp.down_proj.weight"))))
    return layers


def rope_tables(n_pos: int, head_dim: int, device, dtype) -> tuple[Tensor, Tensor]:
    """cos [n, D] = [cos | cos] and sin [n, D] = [-sin | sin] for split-half RoPE, computed in fp32."""
    inv = ROPE_THETA ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(n_pos, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


@dataclass
class KVWindow:
    """Which cache rows a set of queries attends: keys [0, n_valid) out of the first `n_keys` rows.

    n_valid lives on the device (it depends on the prompt length), so a captured graph serves any
    length. The flash backend reads it from cumulative-length tensors, SDPA from a key mask.
    """

    n_keys: int
    max_q: int  # query rows (tokens * heads) given to the flash kernel
    cu_q: Tensor | None = None  # int32 [0, valid query rows]
    cu_k: Tensor | None = None  # int32 [0, n_valid]
    key_mask: Tensor | None = None  # bool [n_keys]

    def attend(self, ops, q: Tensor, k_cache: Tensor, v_cache: Tensor, quant: Tensor | None = None,
               fresh_tail: int = -1) -> Tensor:
        """fresh_tail: see ops.attention_flash_varlen (a scheduling hint; the result is the same)."""
        k, v = k_cache[: self.n_keys], v_cache[: self.n_keys]
        if self.key_mask is None:
            return ops.attention_flash_varlen(q, k, v, self.cu_q, self.cu_k, self.max_q, self.n_keys, quant,
                                              fresh_tail)
        return ops.attention_sdpa(q, k, v, self.key_mask, quant)


@dataclass
class Modulation:
    """Pi0.5 adaRMSNorm terms for one denoising step: row j is norm j (layer l: 2l input, 2l+1 post;
    last row the final norm)."""

    scale1p: Tensor  # [2 * depth + 1, width], 1 + scale
    shift: Tensor
    gate: Tensor


# `quant`: the inverse input scale of the FP8 projection that reads the output (None: bf16 out).
def _norm(ops, x: Tensor, mod: Modulation | None, j: int, quant: Tensor | None) -> Tensor:
    if mod is None:
        return ops.rms_norm(x, EPS, quant)
    return ops.ada_rms_norm(x, mod.scale1p[j], mod.shift[j], EPS, quant)


def _add_norm(ops, x: Tensor, y: Tensor, mod: Modulation | None, gate_row: int, j: int,
              quant: Tensor | None) -> Tensor:
    if mod is None:
        return ops.add_rms_norm(x, y, EPS, quant)
    return ops.add_ada_rms_norm(x, y, mod.gate[gate_row], mod.scale1p[j], mod.shift[j], EPS, quant)


def _no_prefetch(weight) -> None:  # what run_layers calls for each weight when it does not prefetch
    pass


def run_layers(ops, dims: GemmaDims, layers: list[GemmaLayer], x: Tensor, cos: Tensor, sin: Tensor,
               k_cache: Tensor, v_cache: Tensor, slots: Tensor | None, window: KVWindow,
               mod: Modulation | None = None, kv_only: bool = False, span: range | None = None,
               prefetch: bool = False) -> Tensor | None:
    """Run decoder layers over tokens x [T, width] (updated in place as the residual stream).

    Each layer writes its K/V into rows `slots` of k_cache[l] / v_cache[l] (rows 0..T-1 if None) and
    attends over `window`. Returns the final-normed output (without the final norm's weight, which
    the caller folds into its output projection), or None with `kv_only` (the prefix and Pi0's state
    token are only needed for their K/V, so the last layer stops once they are written). `span` runs only
    those layers (a segment of the stack): the residual stream x carries over between spans.

    `prefetch` (the denoising steps, whose 50 rows make every GEMM a weight stream that leaves most
    of HBM's bandwidth unused): as each GEMM starts, the next GEMM's weights are asked for, so they
    load into L2 beside it (ops.prefetch_l2; a no-op where the platform does not prefetch). Asked
    for earlier, beside the latency-bound kernels between GEMMs, they slowed those kernels down
    more than the GEMMs gained (csrc/README.md).
    """
    span = span if span is not None else range(len(layers))
    h = _norm(ops, x, mod, 2 * span.start, fp8_input(layers[span.start].qkv))
    last = len(layers) - 1
    with ops.prefetch_l2() if prefetch else nullcontext(_no_prefetch) as ahead:
        for i in span:
            L = layers[i]
            ahead(streamed(L.o))
            qkv = linear(h, L.qkv, ops=ops)
            q = ops.rope_qkv(qkv, cos, sin, dims.heads, k_cache[i], v_cache[i], slots)
            if kv_only and i == last:  # its K/V rows are written: an attention here would feed nothing
                return None
            # rope_qkv has just written these tokens' K/V: in every window here they are its last
            # valid keys, and the keys before them are older (the attention may load those early).
            a = window.attend(ops, q, k_cache[i], v_cache[i], fp8_input(L.o), fresh_tail=q.shape[0])
            ahead(streamed(L.gate_up))
            o = linear(a, L.o, ops=ops)
            h = _add_norm(ops, x, o, mod, 2 * i, 2 * i + 1, fp8_input(L.gate_up))
            ahead(streamed(L.down))
            gu = linear(h, L.gate_up, ops=ops)
            g = ops.gelu_tanh_mul(gu, fp8_input(L.down))
            ahead(streamed(layers[(i + 1) % len(layers)].qkv))  # the last layer's: the next step's first
            d = linear(g, L.down, ops=ops)
            # The next layer's QKV reads this norm; the stack's last output (or a span's, which the
            # next span renormalizes) stays in the model dtype.
            nxt = fp8_input(layers[i + 1].qkv) if i + 1 in span else None
            h = _add_norm(ops, x, d, mod, 2 * i + 1, 2 * i + 2, nxt)
    return h
