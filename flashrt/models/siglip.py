"""SigLIP So400m/14 image encoder plus PaliGemma's projector: images -> prefix tokens.

Pre-LayerNorm ViT without a pooling head. The patch convolution runs as one GEMM over unfolded
patches; Q/K/V are one fused projection; the conv bias is folded into the position table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant import fp8_input, linear
from .layout import PROJ, V, VisionDims

EPS = 1e-6


@dataclass
class SiglipLayer:  # weights may be swapped for quant.QuantWeight (then the bias lives in it, *_b None)
    LINEARS = ("qkv", "o", "fc1", "fc2")

    ln1_w: Tensor
    ln1_b: Tensor
    qkv_w: Tensor
    qkv_b: Tensor
    o_w: Tensor
    o_b: Tensor
    ln2_w: Tensor
    ln2_b: Tensor
    fc1_w: Tensor
    fc1_b: Tensor
    fc2_w: Tensor
    fc2_b: Tensor


class Siglip:
    def __init__(self, dims: VisionDims, get: Callable[[str], Tensor], cast: Callable[[Tensor], Tensor]):
        self.dims = dims
        e = f"{V}.embeddings"
        self.patch_w = cast(get(f"{e}.patch_embedding.weight").flatten(1))  # [W, 3*p*p], (c, y, x) order
        self.pos = cast(get(f"{e}.position_embedding.weight") + get(f"{e}.patch_embedding.bias"))
        self.layers = []
        for n in range(dims.depth):
            p = f"{V}.encoder.layers.{n}"
            a = f"{p}.self_attn"
            self.layers.append(SiglipLayer(
                ln1_w=cast(get(f"{p}.layer_norm1.weight")), ln1_b=cast(get(f"{p}.layer_norm1.bias")),
                qkv_w=cast(torch.cat([get(f"{a}.{x}_proj.weight") for x in "qkv"])),
                qkv_b=cast(torch.cat([get(f"{a}.{x}_proj.bias") for x in "qkv"])),
                o_w=cast(get(f"{a}.out_proj.weight")), o_b=cast(get(f"{a}.out_proj.bias")),
                ln2_w=cast(get(f"{p}.layer_norm2.weight")), ln2_b=cast(get(f"{p}.layer_norm2.bias")),
                fc1_w=cast(get(f"{p}.mlp.fc1.weight")), fc1_b=cast(get(f"{p}.mlp.fc1.bias")),
                fc2_w=cast(get(f"{p}.mlp.fc2.weight")), fc2_b=cast(get(f"{p}.mlp.fc2.bias"))))
        self.post_w = cast(get(f"{V}.post_layernorm.weight"))
        self.post_b = cast(get(f"{V}.post_layernorm.bias"))
        self.proj_w = cast(get(f"{PROJ}.weight"))
        self.proj_b = cast(get(f"{PROJ}.bias"))

    def forward(self, ops, images: Tensor, out: Tensor) -> None:
        """images [C, 3, S, S] in [-1, 1] -> out [C * tokens, vlm_width] (written in place)."""
        d = self.dims
        c, g = images.shape[0], d.image // d.patch
        patches = images.view(c, 3, g, d.patch, g, d.patch).permute(0, 2, 4, 1, 3, 5).reshape(c * g * g, -1)
        x = F.linear(patches, self.patch_w).view(c, g * g, d.width).add_(self.pos).view(c * g * g, d.width)
        hd = d.width // d.heads
        # (a norm feeding an FP8 projection writes its FP8 input: `quant`, see ops.torch_ops)
        h = ops.layer_norm(x, self.layers[0].ln1_w, self.layers[0].ln1_b, EPS, fp8_input(self.layers[0].qkv_w))
        for i, L in enumerate(self.layers):
            qkv = linear(h, L.qkv_w, L.qkv_b, ops).view(c, g * g, 3, d.heads, hd)
            a = ops.attention_mha(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
            h = ops.add_layer_norm(x, linear(a, L.o_w, L.o_b, ops), L.ln2_w, L.ln2_b, EPS, fp8_input(L.fc1_w))
            m = linear(ops.gelu_tanh(linear(h, L.fc1_w, L.fc1_b, ops), fp8_input(L.fc2_w)), L.fc2_w, L.fc2_b, ops)
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            h = ops.add_layer_norm(x, m, nxt.ln1_w if nxt else self.post_w, nxt.ln1_b if nxt else self.post_b, EPS,
                                   fp8_input(nxt.qkv_w) if nxt else None)
        torch.addmm(self.proj_b, h, self.proj_w.t(), out=out)
