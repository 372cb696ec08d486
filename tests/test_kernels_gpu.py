"""Native kernels (flashrt._kernels) against their PyTorch references, on the GPU.

Run on the GPU machine: `pytest -m gpu tests/test_kernels_gpu.py`. Every case draws fresh random
inputs (the seed is in the failure message), uses the real Pi0.5 shapes (VLM width 2048, expert
1024, head dim 256, 8 heads, MLP 16384 / 4096, SigLIP 1152, prefix ~712 tokens, suffix 50) and
poisons every output with NaN first (native._empty is replaced), so an element a kernel did not
write fails the check. Each result is compared with a float64 evaluation of the op on the same
inputs (relative error ||out - exact|| / ||exact|| within the dtype's tolerance, and no worse than
about the torch op's own error) and with the torch op itself.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from flashrt import preprocess, quant
from flashrt.ops import native, torch_ops

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Norm-wise relative error allowed against the float64 evaluation.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
EPS = 1e-6
DEV = "cuda"


@pytest.fixture(autouse=True)
def gpu_and_poison(monkeypatch):
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"
    assert native.available(), "flashrt._kernels is not built: pip install -e . on the GPU machine"

    def poisoned(shape, dtype, device):  # NaN, or for int8 -128, which no kernel writes (it saturates at +-127)
        return torch.full(shape, -128 if dtype == torch.int8 else float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(native, "_empty", poisoned)
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name, got, ref, exact, dtype, seed, scale=1.0):
    """got (native) and ref (torch op) against exact (float64)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten) output elements [seed {seed}]"
    e_nat, e_ref = rel(got, exact), rel(ref, exact)
    tol = TOL[dtype] * scale
    assert e_nat <= tol, f"{name}: rel. error {e_nat:.2e} vs float64 > {tol:.1e} (torch op: {e_ref:.2e}) [seed {seed}]"
    assert e_nat <= max(2 * e_ref, tol / 4), f"{name}: {e_nat:.2e} much worse than the torch op's {e_ref:.2e} [seed {seed}]"
    assert rel(got, ref) <= tol, f"{name}: differs from the torch op by {rel(got, ref):.2e} [seed {seed}]"


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale + shift).to(dtype)


# ---------------------------------------------------------------------------------------------
# Norms


def exact_norm(x, y, gate, scale, shift, layer):
    x = x.double()
    if y is not None:
        x = x + (y.double() * gate.double() if gate is not None else y.double())
    if layer:
        n = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
    else:
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return n * scale.double() + shift.double() if scale is not None else n


NORM_CASES = [  # (op, rows, width, strided rows)
    ("rms_norm", 712, 2048, False), ("rms_norm", 50, 1024, False),
    ("add_rms_norm", 712, 2048, False), ("add_rms_norm", 50, 1024, True),
    ("ada_rms_norm", 50, 1024, False), ("add_ada_rms_norm", 50, 1024, False),
    ("add_ada_rms_norm", 7, 1024, True),
    ("layer_norm", 512, 1152, False), ("add_layer_norm", 512, 1152, False), ("add_layer_norm", 256, 1152, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,rows,width,strided", NORM_CASES, ids=lambda v: str(v))
def test_norm(gpu_and_poison, op, rows, width, strided, dtype):
    seed = gpu_and_poison
    if strided:  # row views of a wider buffer: row stride != width
        x0 = randn(rows, width + 64, dtype=dtype, scale=3.0)[:, 32:32 + width]
    else:
        x0 = randn(rows, width, dtype=dtype, scale=3.0)
    y = randn(rows, width, dtype=dtype)
    mods = randn(5, width, dtype=dtype, scale=0.1)  # rows of a [J, width] table, like Modulation
    scale, shift, gate = (mods[1] + 1).contiguous(), mods[2], randn(width, dtype=dtype, scale=0.5)
    w, b = randn(width, dtype=dtype, scale=0.1, shift=1.0), randn(width, dtype=dtype, scale=0.1)
    args = {
        "rms_norm": ((), (None, None, None, None, False)),
        "add_rms_norm": ((y,), (y, None, None, None, False)),
        "ada_rms_norm": ((scale, shift), (None, None, scale, shift, False)),
        "add_ada_rms_norm": ((y, gate, scale, shift), (y, gate, scale, shift, False)),
        "layer_norm": ((w, b), (None, None, w, b, True)),
        "add_layer_norm": ((y, w, b), (y, None, w, b, True)),
    }[op]
    exact = exact_norm(x0, *args[1])
    x_nat, x_ref = x0.clone(), x0.clone()
    if strided:
        x_nat = torch.empty(rows, width + 64, dtype=dtype, device=DEV)[:, 32:32 + width].copy_(x0)
    got = getattr(native, op)(x_nat, *args[0], EPS)
    ref = getattr(torch_ops, op)(x_ref, *args[0], EPS)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    check(op, got, ref, exact, dtype, seed)
    if op.startswith("add"):  # the residual stream, updated in place like the torch op does
        assert rel(x_nat, x_ref) <= TOL[dtype] / 4, f"{op}: residual differs [seed {seed}]"
        assert not torch.equal(x_nat, x0)


# ---------------------------------------------------------------------------------------------
# FP8 output for FP8 projections: norms and the GELUs write it themselves, quantize_fp8 for the rest

FP8_CASES = [  # (op, rows, width): the input widths of Pi0.5's FP8 projections
    ("rms_norm", 712, 2048), ("add_rms_norm", 712, 2048), ("ada_rms_norm", 50, 1024),
    ("add_ada_rms_norm", 50, 1024), ("layer_norm", 512, 1152), ("add_layer_norm", 512, 1152),
    ("gelu_tanh_mul", 50, 4096), ("gelu_tanh_mul", 712, 16384), ("gelu_tanh", 512, 4304), ("quantize_fp8", 400, 2048),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op,rows,width", FP8_CASES, ids=lambda v: str(v))
def test_fp8_output(gpu_and_poison, op, rows, width, dtype):
    """The fused FP8 output is exactly quant.quantize_fp8 of the kernel's own model-dtype output
    (saturating: the scale makes some values clip), and the residual update is unchanged."""
    from flashrt.quant import FP8, quantize_fp8

    seed = gpu_and_poison
    x0 = randn(rows, 2 * width if op == "gelu_tanh_mul" else width, dtype=dtype, scale=3.0)
    y = randn(rows, width, dtype=dtype)
    scale, shift, gate = randn(width, dtype=dtype, scale=0.1, shift=1.0), randn(width, dtype=dtype, scale=0.1), \
        randn(width, dtype=dtype, scale=0.5)
    args = {"rms_norm": (EPS,), "add_rms_norm": (y, EPS), "ada_rms_norm": (scale, shift, EPS),
            "add_ada_rms_norm": (y, gate, scale, shift, EPS), "layer_norm": (scale, shift, EPS),
            "add_layer_norm": (y, scale, shift, EPS), "gelu_tanh_mul": (), "gelu_tanh": (), "quantize_fp8": ()}[op]
    inv = torch.tensor([448.0 / 2.5], device=DEV)  # |values| beyond 2.5 saturate
    x_plain, x_fused, x_ref = x0.clone(), x0.clone(), x0.clone()
    if op == "quantize_fp8":
        plain, got, ref = x0, native.quantize_fp8(x0, inv), torch_ops.quantize_fp8(x0, inv)
    else:
        plain = getattr(native, op)(x_plain, *args)
        got = getattr(native, op)(x_fused, *args, quant=inv)
        ref = getattr(torch_ops, op)(x_ref, *args, quant=inv)
    assert got.dtype == FP8 and got.shape == plain.shape
    assert not torch.isnan(got.float()).any(), f"{op}: unwritten FP8 elements [seed {seed}]"
    want = quantize_fp8(plain, inv)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{op}: FP8 bytes differ [seed {seed}]"
    assert (got.float().abs() == 448).float().mean() > 0.001, f"{op}: nothing saturated [seed {seed}]"
    # Against the torch ops (whose bf16 output can differ by one rounding, twice for adaRMSNorm's
    # norm-then-addcmul): most bytes equal.
    same = (got.view(torch.uint8) == ref.view(torch.uint8)).float().mean()
    assert same > 0.95, f"{op}: only {same:.3f} of the bytes equal the torch reference's [seed {seed}]"
    assert torch.equal(x_fused, x_plain), f"{op}: the residual update changed [seed {seed}]"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width,n", [(50, 1024, 2560), (7, 2048, 1024), (712, 16384, 2048), (513, 1152, 4304)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_quantize_and_dequantize(gpu_and_poison, rows, width, n, bias, dtype):
    """W8A8 around torch._int_mm, exactly its torch reference: per-token quantization (short inputs
    arrive zero-padded to 32 rows) and the dequantization of the int32 product."""
    seed = gpu_and_poison
    x = randn(rows, width, dtype=dtype, scale=3.0)
    x[0, :7] = 0  # a row's zeros and a whole zero row: scale clamps, q is 0
    if rows > 1:
        x[1] = 0
    q, s = native.quantize_int8(x)
    q_ref, s_ref = torch_ops.quantize_int8(x)
    assert q.shape == q_ref.shape == (max(rows, 32) if rows < 17 else rows, width) and s.shape == (rows, 1)
    assert (q != -128).all(), f"unwritten int8 elements [seed {seed}]"
    assert torch.equal(s, s_ref), f"per-token scales differ [seed {seed}]"
    diff = (q.int() - q_ref.int()).abs()
    assert torch.equal(q, q_ref), f"quantize differs: {int((diff > 0).sum())} values, by up to {int(diff.max())} [seed {seed}]"
    w_scale = torch.rand(1, n, device=DEV) / 100
    b = randn(n, dtype=dtype) if bias else None
    acc = torch.randint(-2**20, 2**20, (q.shape[0], n), dtype=torch.int32, device=DEV)
    got = native.dequantize_int8(acc, s, w_scale, b, dtype)
    ref = torch_ops.dequantize_int8(acc, s, w_scale, b, dtype)
    assert got.shape == (rows, n) and torch.isfinite(got).all(), f"unwritten outputs [seed {seed}]"
    assert torch.equal(got, ref), f"dequantize differs by {rel(got, ref):.2e} [seed {seed}]"


# ---------------------------------------------------------------------------------------------
# GeGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,m", [(712, 16384), (50, 4096), (1, 4096), (513, 4304)])
@pytest.mark.parametrize("op", ["gelu_tanh_mul", "gelu_tanh"])
def test_gelu_tanh(gpu_and_poison, op, rows, m, dtype):
    seed = gpu_and_poison
    gated = op == "gelu_tanh_mul"
    x = randn(rows, (2 if gated else 1) * m, dtype=dtype, scale=2.0)
    got = getattr(native, op)(x)
    ref = getattr(torch_ops, op)(x)
    g = x[:, :m].double()
    exact = 0.5 * g * (1 + torch.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    if gated:
        exact = exact * x[:, m:].double()
    assert got.shape == (rows, m)
    check(op, got, ref, exact, dtype, seed)


# ---------------------------------------------------------------------------------------------
# RoPE + KV cache


def rope_tables(pos, d, dtype):
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=DEV, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.cos()], -1).to(dtype), torch.cat([-ang.sin(), ang.sin()], -1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["prefix", "steps", "state"])
def test_rope_qkv(gpu_and_poison, case, dtype):
    seed = gpu_and_poison
    heads, d, depth, n = 8, 256, 3, 820
    p = int(torch.randint(600, 760, ()).item())  # valid prefix length
    t, slots = {"prefix": (712, None), "steps": (50, torch.arange(p, p + 50, device=DEV)),
                "state": (1, torch.tensor([p], device=DEV))}[case]
    pos = torch.arange(t, device=DEV) if slots is None else slots
    cos, sin = rope_tables(pos, d, dtype)
    qkv = randn(t, (heads + 2) * d, dtype=dtype)
    caches = [torch.full((depth, n, d), float("nan"), dtype=dtype, device=DEV) for _ in range(4)]
    got = native.rope_qkv(qkv, cos, sin, heads, caches[0][1], caches[1][1], slots)
    ref = torch_ops.rope_qkv(qkv, cos, sin, heads, caches[2][1], caches[3][1], slots)
    x = qkv.double().view(t, heads + 2, d)
    c, s = cos.double()[:, None], sin.double()[:, None]
    rot = x[:, : heads + 1] * c + torch.roll(x[:, : heads + 1], d // 2, dims=-1) * s
    assert got.shape == (t, heads, d)
    check("rope q", got, ref, rot[:, :heads], dtype, seed)
    rows = torch.arange(t, device=DEV) if slots is None else slots
    check("rope k", caches[0][1][rows], caches[2][1][rows], rot[:, heads], dtype, seed)
    assert torch.equal(caches[1][1][rows], qkv.view(t, heads + 2, d)[:, heads + 1]), "v is copied exactly"
    # nothing else in the caches was touched
    untouched = torch.ones(depth, n, dtype=torch.bool, device=DEV)
    untouched[1, rows] = False
    assert caches[0][untouched].isnan().all() and caches[1][untouched].isnan().all(), f"stray cache writes [seed {seed}]"


# ---------------------------------------------------------------------------------------------
# Attention


def exact_attention(q, k, v, valid):
    t, h, d = q.shape
    s = q.double().reshape(t * h, d) @ k.double()[valid].T
    return (torch.softmax(s, -1) @ v.double()[valid]).view(t, h * d)


ATTN_CASES = [  # (query tokens, heads, cache rows, valid keys)
    (50, 8, 762, 762), (50, 8, 762, 350), (50, 8, 1018, 1018), (1, 8, 769, 713), (50, 8, 100, 37),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("t,h,n,nk", ATTN_CASES, ids=lambda v: str(v))
def test_attention_flash_varlen(gpu_and_poison, t, h, n, nk, dtype):
    seed = gpu_and_poison
    d = 256
    q = randn(t, h, d, dtype=dtype, scale=d**-0.5 * 2)  # pre-scaled queries, logits of a few units
    k, v = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype)
    k[nk:], v[nk:] = float("nan"), float("nan")  # rows past the valid keys must never be read
    cu_q = torch.tensor([0, t * h], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, nk], dtype=torch.int32, device=DEV)
    fn = native.make_attention_flash_varlen(1024)
    got = fn(q, k, v, cu_q, cu_k, t * h, n)
    ref = torch_ops.attention_flash_varlen(q, k, v, cu_q, cu_k, t * h, n)
    exact = exact_attention(q, k, v, slice(0, nk))
    assert got.shape == (t, h * d)
    check("attention", got, ref, exact, dtype, seed)
    # every launch shape gives the same function (empty splits included: 32 splits > key tiles)
    for warps in (2, 4):
        for splits in (1, 3, 32):
            out = native.attention_decode(q.reshape(t * h, d), k, v, cu_q, cu_k, None, splits=splits,
                                          warps=warps).view(t, h * d)
            check(f"attention warps={warps} splits={splits}", out, ref, exact, dtype, seed)
    # loading the keys before a fresh tail ahead of the PDL wait changes no bit
    assert torch.equal(fn(q, k, v, cu_q, cu_k, t * h, n, fresh_tail=t), got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("splits", [1, 12])
def test_attention_fp8_output(gpu_and_poison, splits, dtype):
    """The FP8 input of an FP8 o projection, written by the attention itself (one split: the partial
    kernel stores it; several: the merge does): exactly quantize_fp8 of the kernel's own output."""
    from flashrt.quant import FP8, quantize_fp8

    seed = gpu_and_poison
    t, h, d, n, nk = 50, 8, 256, 762, 700
    q = randn(t, h, d, dtype=dtype, scale=d**-0.5 * 2)
    k, v = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype, scale=4.0)
    cu_q = torch.tensor([0, t * h], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, nk], dtype=torch.int32, device=DEV)
    inv = torch.tensor([448.0 / 0.5], device=DEV)  # |outputs| beyond 0.5 saturate
    plain = native.attention_decode(q.view(t * h, d), k, v, cu_q, cu_k, None, splits=splits)
    got = native.attention_decode(q.view(t * h, d), k, v, cu_q, cu_k, None, splits=splits, quant=inv)
    assert got.dtype == FP8 and not torch.isnan(got.float()).any(), f"unwritten FP8 elements [seed {seed}]"
    want = quantize_fp8(plain, inv)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"FP8 bytes differ [seed {seed}]"
    assert (got.float().abs() == 448).float().mean() > 0.001, f"nothing saturated [seed {seed}]"
    fused = native.make_attention_flash_varlen(1024)(q, k, v, cu_q, cu_k, t * h, n, inv)
    ref = torch_ops.attention_flash_varlen(q, k, v, cu_q, cu_k, t * h, n, inv)
    assert fused.dtype == ref.dtype == FP8 and fused.shape == ref.shape == (t, h * d)
    same = (fused.view(torch.uint8) == ref.view(torch.uint8)).float().mean()
    assert same > 0.95, f"only {same:.3f} of the bytes equal the torch reference's [seed {seed}]"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_valid_query_rows(gpu_and_poison, dtype):
    """Query rows at or past cu_q[1] are left unwritten, as the torch op documents."""
    seed = gpu_and_poison
    t, h, d, n, nq = 50, 8, 256, 700, 77
    q = randn(t, h, d, dtype=dtype, scale=0.1)
    k, v = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype)
    cu_q = torch.tensor([0, nq], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    for splits, warps in ((1, 4), (8, 2), (5, 4)):
        out = native.attention_decode(q.reshape(t * h, d), k, v, cu_q, cu_k, None, splits=splits, warps=warps)
        exact = exact_attention(q, k, v, slice(0, n)).view(t * h, d)
        assert out[nq:].isnan().all(), f"rows past cu_q[1] were written [seed {seed}]"
        assert rel(out[:nq], exact[:nq]) <= TOL[dtype], f"splits={splits} [seed {seed}]"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_sdpa_key_mask(gpu_and_poison, dtype):
    seed = gpu_and_poison
    t, h, d, n = 50, 8, 256, 762
    q = randn(t, h, d, dtype=dtype, scale=d**-0.5 * 2)
    k, v = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype)
    mask = torch.rand(n, device=DEV) < 0.7
    k[~mask], v[~mask] = float("nan"), float("nan")  # masked keys are never read either
    got = native.make_attention_sdpa(1024)(q, k, v, mask)
    k0, v0 = k.masked_fill(~mask[:, None], 0), v.masked_fill(~mask[:, None], 0)
    ref = torch_ops.attention_sdpa(q, k0, v0, mask)
    check("attention_sdpa", got, ref, exact_attention(q, k, v, mask), dtype, seed)


def test_attention_large_query_counts_use_torch(gpu_and_poison):
    """Above the platform's row bound (the prefix) the wrapper runs torch's FlashAttention."""
    t, h, d, n = 712, 8, 256, 712
    q = randn(t, h, d, dtype=torch.bfloat16, scale=0.1)
    k, v = randn(n, d, dtype=torch.bfloat16), randn(n, d, dtype=torch.bfloat16)
    cu = torch.tensor([0, t * h], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    got = native.make_attention_flash_varlen(1024)(q, k, v, cu, cu_k, t * h, n)
    ref = torch_ops.attention_flash_varlen(q, k, v, cu, cu_k, t * h, n)
    assert torch.equal(got, ref)


def test_graph_serves_every_length(gpu_and_poison):
    """Lengths live on the device: one captured graph of rope + attention follows cu_k and slots."""
    seed = gpu_and_poison
    dtype, heads, d, n, t = torch.bfloat16, 8, 256, 900, 50
    k_cache = randn(n, d, dtype=dtype)
    v_cache = randn(n, d, dtype=dtype)
    qkv = randn(t, (heads + 2) * d, dtype=dtype)
    slots = torch.zeros(t, dtype=torch.int64, device=DEV)
    cos, sin = rope_tables(torch.arange(t, device=DEV), d, dtype)
    cu_q = torch.tensor([0, t * heads], dtype=torch.int32, device=DEV)
    cu_k = torch.zeros(2, dtype=torch.int32, device=DEV)
    attn = native.make_attention_flash_varlen(1024)

    def step():
        q = native.rope_qkv(qkv, cos, sin, heads, k_cache, v_cache, slots)
        return attn(q, k_cache, v_cache, cu_q, cu_k, t * heads, n)

    def set_len(p):
        slots.copy_(torch.arange(p, p + t, device=DEV))
        cu_k[1] = p + t

    set_len(500)
    step()  # warm-up outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for p in (300, 700, 812):
        set_len(p)
        g.replay()
        torch.cuda.synchronize()
        q = torch_ops.rope_qkv(qkv, cos, sin, heads, k_cache.clone(), v_cache.clone(), slots)
        exact = exact_attention(q, k_cache, v_cache, slice(0, p + t))
        assert rel(out, exact) <= TOL[dtype], f"prefix {p} [seed {seed}]"


def test_programmatic_launch_and_prefetch_change_no_bit(gpu_and_poison):
    """With programmatic dependent launch a kernel starts while the one before it drains; each waits
    for its producer before touching memory. A graph of an expert-like chain (in-place residual
    norms, cuBLAS GEMMs, rope into the cache, split attention and its merge, GeGLU), replayed many
    times, gives the same bits with PDL on and off: a kernel reading too early would not (the
    attention loads the cache rows before rope's ahead of its wait, by design). So does
    the chain with the denoising steps' L2 prefetches branching off it on a side stream."""
    from flashrt import _kernels

    seed = gpu_and_poison
    dtype, heads, d, n, t, width, mlp = torch.bfloat16, 8, 256, 700, 50, 1024, 4096
    w_qkv, w_o = randn((heads + 2) * d, width, dtype=dtype, scale=0.03), randn(width, heads * d, dtype=dtype, scale=0.03)
    w_gu, w_down = randn(2 * mlp, width, dtype=dtype, scale=0.03), randn(width, mlp, dtype=dtype, scale=0.02)
    x0, k0, v0 = randn(t, width, dtype=dtype), randn(n, d, dtype=dtype), randn(n, d, dtype=dtype)
    slots = torch.arange(n - t, n, device=DEV)
    cos, sin = rope_tables(slots, d, dtype)
    cu_q = torch.tensor([0, t * heads], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    attn = native.make_attention_flash_varlen(1024)

    def run(pdl: bool, prefetch: bool = False) -> list[torch.Tensor]:
        assert _kernels.set_programmatic_launch(pdl), "an sm_90+ GPU supports programmatic dependent launch"
        try:
            x, k, v = x0.clone(), k0.clone(), v0.clone()
            y = torch.zeros_like(x)

            def layers():
                with native.prefetch_l2() as ahead:
                    for _ in range(4):
                        layer(ahead if prefetch else lambda w: None)

            def layer(ahead):  # each GEMM's weights asked for as the GEMM before it starts, as the model does
                h = native.add_rms_norm(x, y, EPS)
                ahead(w_o)
                q = native.rope_qkv(h @ w_qkv.T, cos, sin, heads, k, v, slots)
                a = attn(q, k, v, cu_q, cu_k, t * heads, n, fresh_tail=t)  # K/V before rope's rows load early
                ahead(w_gu)
                h = native.add_rms_norm(x, a @ w_o.T, EPS)
                ahead(w_down)
                g = native.gelu_tanh_mul(h @ w_gu.T)
                ahead(w_qkv)
                y.copy_(g @ w_down.T)

            layers()  # warm-up outside capture
            x.copy_(x0), k.copy_(k0), v.copy_(v0), y.zero_()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                layers()
            outs = []
            for _ in range(20):
                x.copy_(x0), k.copy_(k0), v.copy_(v0), y.zero_()
                g.replay()
                outs.append(torch.cat([x.flatten(), k.flatten(), y.flatten()]).clone())
            torch.cuda.synchronize()
            return outs
        finally:
            _kernels.set_programmatic_launch(True)

    plain = run(False)
    assert torch.isfinite(plain[0]).all(), f"non-finite chain output [seed {seed}]"
    variants = (("PDL", run(True)), ("PDL and prefetch", run(True, True)), ("prefetch", run(False, True)))
    for label, outs in variants:
        for i, (a, b) in enumerate(zip(plain, outs)):
            changed = int((a != b).sum())
            assert torch.equal(a, b), f"replay {i}: {label} changed {changed} elements [seed {seed}]"


def test_prefetch_range_is_checked(gpu_and_poison):
    """A prefetch range must be 16-byte aligned and a multiple of 16 bytes: the launcher refuses
    others, and the Python side skips tensors that do not qualify (a hint never fails)."""
    from flashrt import _kernels

    w = randn(64, 64, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="16-byte aligned"):
        _kernels.l2_prefetch(w.data_ptr() + 2, 64, stream)
    with pytest.raises(ValueError, match="16-byte aligned"):
        _kernels.l2_prefetch(w.data_ptr(), 40, stream)
    with native.prefetch_l2() as ahead:
        for t in (w, w.flatten()[1:], w.t(), w.cpu()):  # launched; misaligned, strided, on the host: skipped
            ahead(t)
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Split-K GEMM for few rows (the action expert's shapes; csrc/skinny_gemm.cu)


@pytest.mark.parametrize("rows", [50, 1, 56])
@pytest.mark.parametrize("shape,config", [
    ((1024, 2560), (8, 4, 2)),   # qkv: splits, wf, ksplit
    ((2048, 1024), (8, 4, 2)),   # o
    ((1024, 8192), (2, 8, 2)),   # gate_up
    ((4096, 1024), (8, 4, 2)),   # down
    ((4096, 1024), (16, 4, 1)),
    ((1024, 2560), (2, 4, 1)),
], ids=["qkv", "o", "gate_up", "down", "down-s16-k1", "qkv-s2-k1"])
def test_skinny_gemm_partials(gpu_and_poison, shape, config, rows):
    seed = gpu_and_poison
    (k, n), (splits, wf, ksplit) = shape, config
    x = randn(rows, k, dtype=torch.bfloat16)
    w = randn(n, k, dtype=torch.bfloat16, scale=0.03)
    wt = quant.tile_skinny_weight(w, wf)
    got = native.skinny_gemm_partials(x, wt, n, splits, wf, ksplit)
    ref = torch_ops.skinny_gemm_partials(x, wt, n, splits, wf, ksplit)
    ks = k // splits
    exact = torch.stack([x[:, s * ks:(s + 1) * ks].double() @ w[:, s * ks:(s + 1) * ks].double().T
                         for s in range(splits)])
    assert got.shape == (splits, rows, n)
    check("skinny_gemm_partials", got, ref, exact, torch.float32, seed)


@pytest.mark.parametrize("gated", [True, False], ids=["ada", "plain"])
def test_norm_sums_split_k_partials(gpu_and_poison, gated):
    """The norm after a skinny GEMM takes its fp32 partials as y: their sum, rounded to the dtype."""
    seed = gpu_and_poison
    x = randn(50, 1024, dtype=torch.bfloat16)
    part = randn(8, 50, 1024, dtype=torch.float32, scale=0.2)
    # gate, 1 + scale, shift
    vecs = [randn(1024, dtype=torch.bfloat16, scale=0.5, shift=s) for s in (0.0, 1.0, 0.0)]
    xn, xr = x.clone(), x.clone()
    if gated:
        got = native.add_ada_rms_norm(xn, part, *vecs, 1e-6)
        ref = torch_ops.add_ada_rms_norm(xr, part, *vecs, 1e-6)
        exact_x = x.double() + part.double().sum(0) * vecs[0].double()
    else:
        got, ref = native.add_rms_norm(xn, part, 1e-6), torch_ops.add_rms_norm(xr, part, 1e-6)
        exact_x = x.double() + part.double().sum(0)
    check("norm(partials) residual", xn, xr, exact_x, torch.bfloat16, seed)
    assert torch.isfinite(got).all(), f"unwritten output [seed {seed}]"
    assert rel(got, ref) <= TOL[torch.bfloat16], \
        f"norm(partials): {rel(got, ref):.2e} from the torch op [seed {seed}]"


def test_norm_refuses_combinations_it_has_no_kernel_for(gpu_and_poison):
    """The raw entry point names the problem (ValueError) instead of launching a wrong variant."""
    from flashrt import _kernels

    x, y, out = (randn(4, 64, dtype=torch.bfloat16) for _ in range(3))
    w = randn(64, dtype=torch.bfloat16)

    def norm(residual, layer_norm, scale=None, gate=None, splits=0):
        _kernels.norm(2, x.data_ptr(), 64, y.data_ptr(), 64, splits, 0, gate or 0, scale or 0, scale or 0,
                      out.data_ptr(), 64, 4, 64, 1e-6, residual, layer_norm, 0, 0)

    for args, message in [((2, True, w.data_ptr(), w.data_ptr()), "not used with layer_norm"),
                          ((1, False, w.data_ptr()), "adaRMSNorm takes the gated residual"),
                          ((2, False, None, w.data_ptr()), "RMSNorm takes the plain residual"),
                          ((3, False), "unknown residual mode"),
                          ((0, False, None, None, 2), "split-K partials")]:
        with pytest.raises(ValueError, match=message):
            norm(*args)
    norm(1, False)  # the plain residual RMSNorm runs
    torch.cuda.synchronize()


def test_skinny_gemm_partials_refuses_what_it_cannot_run(gpu_and_poison):
    x = randn(50, 1024, dtype=torch.bfloat16)
    wt = quant.tile_skinny_weight(randn(1024, 1024, dtype=torch.bfloat16), 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        native.skinny_gemm_partials(x, wt, 1024, 3, 4, 1)  # 1024 / 3 is not whole chunks
    with pytest.raises(ValueError, match="at most 1024"):
        wide = quant.tile_skinny_weight(randn(1024, 4096, dtype=torch.bfloat16), 4)
        native.skinny_gemm_partials(randn(50, 4096, dtype=torch.bfloat16), wide, 1024, 1, 4, 1)
    with pytest.raises(ValueError, match="rows"):
        native.skinny_gemm_partials(randn(57, 1024, dtype=torch.bfloat16), wt, 1024, 4, 4, 1)
    with pytest.raises(ValueError, match="bf16"):
        native.skinny_gemm_partials(x.half(), wt, 1024, 4, 4, 1)
    with pytest.raises(ValueError, match="does not tile"):
        quant.tile_skinny_weight(randn(100, 1024, dtype=torch.bfloat16), 4)


# ---------------------------------------------------------------------------------------------
# Euler update fused with the output projection


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_accumulate(gpu_and_poison, dtype, bias):
    seed = gpu_and_poison
    acc0 = torch.randn(50, 32, device=DEV)
    x = randn(50, 1024, dtype=dtype)
    w = randn(32, 1024, dtype=dtype, scale=0.03 * -0.1)  # dt = -1/10 folded in
    b = randn(32, dtype=dtype, scale=-0.01) if bias else None
    a_nat, a_ref = acc0.clone(), acc0.clone()
    assert native.linear_accumulate(a_nat, x, w, b) is None
    torch_ops.linear_accumulate(a_ref, x, w, b)
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    # the increment is what the op computes; acc itself is much larger
    check("linear_accumulate", a_nat - acc0, a_ref - acc0, exact, dtype, seed)


# ---------------------------------------------------------------------------------------------
# Image preprocessing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_slots", [7, 11])
def test_images_to_model(gpu_and_poison, dtype, n_slots):
    seed = gpu_and_poison
    sizes = [(224, 224), (480, 640), (720, 1280), (100, 300), (300, 100), None, (50, 50), (223, 225),
             (1080, 1920), (64, 512), (17, 9)][:n_slots]
    images = [None if s is None else torch.randint(0, 256, (*s, 3), dtype=torch.uint8, device=DEV) for s in sizes]
    out_nat = torch.full((n_slots, 3, 224, 224), float("nan"), dtype=dtype, device=DEV)
    out_ref = out_nat.clone()
    native.images_to_model(images, out_nat)
    preprocess.images_to_model(images, out_ref)
    for i, s in enumerate(sizes):
        if s is None:
            assert out_nat[i].isnan().all(), "a None slot is left as it is"
            continue
        assert torch.isfinite(out_nat[i]).all(), f"slot {i} {s}: unwritten pixels [seed {seed}]"
        diff = (out_nat[i].float() - out_ref[i].float()).abs().max().item()
        ulp = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
        assert diff <= ulp, f"slot {i} {s}: max diff {diff:.2e} from the torch op [seed {seed}]"
        assert out_nat[i].min() >= -1 - 1e-6 and out_nat[i].max() <= 1 + 1e-6  # fp32: 255 * (2/255) - 1 = 1 + 6e-8


# ---------------------------------------------------------------------------------------------
# The whole model: native kernels against the torch ops (the lead's acceptance check runs the
# benchmark; this one guards the integration).


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pi05", "pi0"])
def test_full_model_native_matches_torch_ops(kind):
    import flashrt

    cfg = {"name": "full", "kind": kind, "checkpoint": "random", "random": {"seed": 0, "size": "full"},
           "cameras": ["a", "b"], "state_dim": 8, "action_dim": 32, "precision": "bf16"}
    rng = np.random.default_rng(0)
    obs = {"images": {"a": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                      "b": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)},
           "state": rng.normal(size=8).astype(np.float32),
           "prompt_tokens": np.concatenate([[2], rng.integers(3, 257000, 40)]).astype(np.int64)}
    noise = rng.normal(size=(50, 32)).astype(np.float32)
    out = {}
    for kernels in ("auto", "torch"):
        policy = flashrt.load({**cfg, "kernels": kernels})
        assert policy.model.ops.native == (kernels == "auto")
        if kernels == "auto" and policy.platform.skinny_gemm:  # the expert's o and down: csrc/skinny_gemm.cu
            from flashrt.quant import SkinnyWeight

            expert = policy.model.expert
            assert all(isinstance(L.o, SkinnyWeight) and isinstance(L.down, SkinnyWeight) for L in expert)
        out[kernels] = policy.infer(obs, noise=noise)["actions"].astype(np.float64)
        del policy
        torch.cuda.empty_cache()
    a, b = out["auto"].ravel(), out["torch"].ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    print(f"{kind}: cosine native vs torch ops {cos:.6f}, max abs diff {np.abs(a - b).max():.3e}")
    assert np.isfinite(a).all() and cos >= 0.9999
