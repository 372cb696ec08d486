"""The fused ops the models call, dispatched once per engine.

`for_platform(platform)` returns a namespace of functions: the native CUDA kernels of
`flashrt._kernels` (wrapped in `native`) where that module is built for the GPU
(`platform.native_kernels`), the PyTorch versions in `torch_ops` otherwise. Models hold the
namespace and never branch on the platform themselves. Each native wrapper has its reference's
signature and falls back to it for inputs its kernel does not cover (CPU tensors, unsupported
dtypes or layouts), so mixing is always safe; `native` in the namespace says which path was chosen.
"""

from __future__ import annotations

from types import SimpleNamespace

from .. import preprocess
from . import torch_ops

OP_NAMES = (
    "rms_norm", "add_rms_norm", "ada_rms_norm", "add_ada_rms_norm", "layer_norm", "add_layer_norm",
    "gelu_tanh_mul", "gelu_tanh", "rope_qkv", "attention_sdpa", "attention_flash_varlen", "attention_mha",
    "linear_accumulate", "images_to_model", "quantize_fp8", "quantize_int8", "dequantize_int8", "prefetch_l2",
)


def reference_ops() -> dict:
    return {name: getattr(torch_ops, name, None) or getattr(preprocess, name) for name in OP_NAMES}


def for_platform(platform) -> SimpleNamespace:
    ops = reference_ops()
    use_native = bool(getattr(platform, "native_kernels", False))
    if use_native:
        from . import native

        ops.update(native.native_ops(platform))
    ops["native"] = use_native
    return SimpleNamespace(**ops)
