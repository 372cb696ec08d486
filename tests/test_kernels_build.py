"""flashrt._kernels as built by `pip install .` (no GPU needed).

Where the module was built (a CUDA compiler was present), it must report the architectures the
build asked for (FLASHRT_CUDA_ARCHS, or by default every FlashRT platform the compiler supports:
sm_87, sm_89, sm_90, plus sm_120 from CUDA 12.8 and sm_110 from CUDA 13.0), and the .so must hold
machine code (an ELF cubin) for each of them in every translation unit; the fat binaries are read
directly, so no cuobjdump is needed. Where it was not built, there must be no CUDA compiler
(otherwise the build silently failed), and the package must fall back to the PyTorch ops.
Either way the dispatch and the native wrappers' CPU fallbacks are checked.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flashrt import hardware, ops, preprocess
from flashrt.ops import native, torch_ops

try:
    from flashrt import _kernels
except ImportError:
    _kernels = None

FLASHRT_ARCHS = ("sm_87", "sm_89", "sm_90", "sm_110", "sm_120")


def find_nvcc() -> str | None:
    """The CUDA compiler CMake's check_language(CUDA) would find: $CUDACXX, else nvcc on PATH."""
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_version_of(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def default_archs(version: tuple[int, int]) -> list[str]:
    """What csrc/CMakeLists.txt builds when FLASHRT_CUDA_ARCHS is empty."""
    archs = ["sm_87", "sm_89", "sm_90"]
    if version >= (13, 0):
        archs.append("sm_110")
    if version >= (12, 8):
        archs.append("sm_120")
    return archs


def fatbin_elf_archs(path: str) -> list[list[int]]:
    """SM versions of the cubins in each fat binary of the shared object's .nv_fatbin section.

    Fat binary layout (as cuobjdump reads it): header {u32 magic 0xBA55ED50, u16 version,
    u16 header size, u64 size of the entries}, then entries {u16 kind (1 PTX, 2 ELF), u16 version,
    u32 header size, u64 payload size, ..., u32 SM version at byte 28}, each followed by its payload.
    """
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF shared object"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = sections[shstrndx][4]

    def name(s):
        end = data.index(b"\0", strtab_off + s[0])
        return data[strtab_off + s[0]:end].decode()

    fat = [s for s in sections if name(s) == ".nv_fatbin"]
    assert fat, "no .nv_fatbin section: no device code in the module"
    start, size = fat[0][4], fat[0][5]
    end, off, out = start + size, start, []
    magic = struct.pack("<I", 0xBA55ED50)
    while True:
        off = data.find(magic, off, end)
        if off < 0:
            break
        _, _, hsize, fsize = struct.unpack_from("<IHHQ", data, off)
        e, stop, archs = off + hsize, off + hsize + fsize, []
        while e < stop:
            kind, _, ehs, psize = struct.unpack_from("<HHIQ", data, e)
            if kind not in (1, 2) or ehs == 0:
                break
            if kind == 2:
                archs.append(struct.unpack_from("<I", data, e + 28)[0])
            e += ehs + psize
        out.append(archs)
        off = stop
    return out


def expected_archs() -> list[str]:
    req = [a for a in re.split(r"[;, ]+", _kernels.requested_archs) if a]
    if req:
        return ["sm_" + re.sub(r"^sm_|-real$", "", a) for a in req]
    major, minor = (int(x) for x in _kernels.cuda_version.split(".")[:2])
    return default_archs((major, minor))


def test_kernels_build():
    """The module holds every expected architecture, or (not built) there is no CUDA compiler."""
    if _kernels is None:
        check_pure_python_fallback()
    else:
        check_module_archs()


def check_module_archs():
    archs = _kernels.archs()
    assert archs == expected_archs(), f"built for {archs}, expected {expected_archs()}"
    if not _kernels.requested_archs and tuple(int(x) for x in _kernels.cuda_version.split(".")[:2]) >= (13, 0):
        assert set(FLASHRT_ARCHS) <= set(archs), "the default build must cover all five FlashRT GPUs"
    fatbins = fatbin_elf_archs(_kernels.__file__)
    want = sorted(int(re.sub(r"\D", "", a)) for a in archs)
    assert len(fatbins) >= 3, f"expected one fat binary per CUDA translation unit, found {len(fatbins)}"
    for i, got in enumerate(fatbins):
        assert sorted(got) == want, f"fat binary {i} holds cubins for {sorted(got)}, expected {want}"
    nvcc = find_nvcc()
    if nvcc and cuobjdump_path(nvcc):  # cross-check with NVIDIA's tool where it is installed
        listed = subprocess.run([cuobjdump_path(nvcc), "--list-elf", _kernels.__file__], capture_output=True,
                                text=True, check=True).stdout
        assert sorted({int(x) for x in re.findall(r"\.sm_(\d+)\.", listed)}) == want, listed


def cuobjdump_path(nvcc: str) -> str | None:
    cand = Path(nvcc).resolve().parent / "cuobjdump"
    return str(cand) if cand.is_file() else shutil.which("cuobjdump")


def check_pure_python_fallback():
    nvcc = find_nvcc()
    assert nvcc is None, f"a CUDA compiler ({nvcc}) is present but flashrt._kernels was not built"
    assert not native.available()
    assert not hardware._kernels_built_for((9, 0)) and not hardware._kernels_built_for((8, 7))
    with pytest.raises(RuntimeError, match="not built"):
        native.native_ops(replace(hardware.probe("cpu"), native_kernels=True))
    ns = ops.for_platform(hardware.probe("cpu"))
    assert ns.native is False and ns.rms_norm is torch_ops.rms_norm


def test_default_arch_list_by_cuda_version():
    assert default_archs((12, 6)) == ["sm_87", "sm_89", "sm_90"]
    assert default_archs((12, 8)) == ["sm_87", "sm_89", "sm_90", "sm_120"]
    assert default_archs((13, 0)) == ["sm_87", "sm_89", "sm_90", "sm_110", "sm_120"]
    nvcc = find_nvcc()
    if nvcc and _kernels is not None and not _kernels.requested_archs:
        # built here by this compiler: the module's list is the one for its version
        assert _kernels.archs() == default_archs(cuda_version_of(nvcc))


def test_arch_matching():
    f = hardware._arch_runs_on
    assert f("sm_90", (9, 0)) and f("sm_90a", (9, 0)) and f("sm_120", (12, 1)) and f("sm_87", (8, 9))
    assert not f("sm_90", (8, 9)) and not f("sm_89", (8, 7)) and not f("sm_90a", (9, 1))
    assert not f("sm_120", (11, 0)) and not f("sm_87", (9, 0)) and not f("bogus", (9, 0))


def test_cpu_platform_uses_torch_ops():
    ns = ops.for_platform(hardware.probe("cpu"))
    assert ns.native is False
    for name in ops.OP_NAMES:
        assert getattr(ns, name) is ops.reference_ops()[name]


def test_native_dispatch_namespace(monkeypatch):
    if _kernels is None:  # the namespace is only assembled here, no kernel runs
        monkeypatch.setattr(native, "_kernels", object())
    plat = replace(hardware.probe("cpu"), native_kernels=True, native_attention_rows=512)
    ns = ops.for_platform(plat)
    assert ns.native is True
    for name in ("rms_norm", "add_rms_norm", "ada_rms_norm", "add_ada_rms_norm", "layer_norm", "add_layer_norm",
                 "gelu_tanh_mul", "gelu_tanh", "rope_qkv", "linear_accumulate", "images_to_model"):
        assert getattr(ns, name) is getattr(native, name), name
    assert ns.attention_flash_varlen is not torch_ops.attention_flash_varlen
    assert ns.attention_mha is torch_ops.attention_mha  # no native version
    no_attn = ops.for_platform(replace(plat, native_attention_rows=0))
    assert no_attn.attention_flash_varlen is torch_ops.attention_flash_varlen
    # the L2 prefetch only where the platform measured it to pay
    assert ns.prefetch_l2 is torch_ops.prefetch_l2
    assert ops.for_platform(replace(plat, l2_prefetch=True)).prefetch_l2 is native.prefetch_l2


def test_native_wrappers_fall_back_on_cpu_tensors():
    """Every native wrapper runs its reference for inputs its kernel does not take (here: CPU)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    x, y = r(6, 64), r(6, 64)
    w, b, gate = r(64), r(64), r(64)
    torch.testing.assert_close(native.rms_norm(x, 1e-6), torch_ops.rms_norm(x, 1e-6), rtol=0, atol=0)
    torch.testing.assert_close(native.ada_rms_norm(x, w, b, 1e-6), torch_ops.ada_rms_norm(x, w, b, 1e-6),
                               rtol=0, atol=0)
    torch.testing.assert_close(native.layer_norm(x, w, b, 1e-6), torch_ops.layer_norm(x, w, b, 1e-6),
                               rtol=0, atol=0)
    for fn in ("add_rms_norm", "add_ada_rms_norm", "add_layer_norm"):
        x1, x2 = x.clone(), x.clone()
        extra = {"add_rms_norm": (), "add_ada_rms_norm": (gate, w, b), "add_layer_norm": (w, b)}[fn]
        o1 = getattr(native, fn)(x1, y, *extra, 1e-6)
        o2 = getattr(torch_ops, fn)(x2, y, *extra, 1e-6)
        torch.testing.assert_close(o1, o2, rtol=0, atol=0)
        torch.testing.assert_close(x1, x2, rtol=0, atol=0)  # the residual stream is updated in place
    gu = r(5, 32)
    torch.testing.assert_close(native.gelu_tanh_mul(gu), torch_ops.gelu_tanh_mul(gu), rtol=0, atol=0)
    torch.testing.assert_close(native.gelu_tanh(gu), torch_ops.gelu_tanh(gu), rtol=0, atol=0)
    d, heads, t = 16, 2, 3
    qkv, cos, sin = r(t, (heads + 2) * d), r(t, d), r(t, d)
    caches = [torch.zeros(8, d) for _ in range(4)]
    slots = torch.tensor([5, 1, 3])
    q1 = native.rope_qkv(qkv, cos, sin, heads, caches[0], caches[1], slots)
    q2 = torch_ops.rope_qkv(qkv, cos, sin, heads, caches[2], caches[3], slots)
    torch.testing.assert_close(q1, q2, rtol=0, atol=0)
    torch.testing.assert_close(caches[0], caches[2], rtol=0, atol=0)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)
    acc1, acc2 = r(4, 8), None
    acc2 = acc1.clone()
    xx, ww, bb = r(4, 32), r(8, 32), r(8)
    native.linear_accumulate(acc1, xx, ww, bb)
    torch_ops.linear_accumulate(acc2, xx, ww, bb)
    torch.testing.assert_close(acc1, acc2, rtol=0, atol=0)
    with native.prefetch_l2() as ahead:  # a host tensor: nothing to prefetch, no side stream, no error
        ahead(ww)
    q, k, v = r(3, 2, 256), r(10, 256), r(10, 256)
    mask = torch.arange(10) < 7
    sdpa = native.make_attention_sdpa(1024)
    torch.testing.assert_close(sdpa(q, k, v, mask), torch_ops.attention_sdpa(q, k, v, mask), rtol=0, atol=0)
    imgs = [torch.randint(0, 256, (30, 50, 3), dtype=torch.uint8, generator=g), None]
    o1, o2 = torch.full((2, 3, 16, 16), 7.0), torch.full((2, 3, 16, 16), 7.0)
    native.images_to_model(imgs, o1)
    preprocess.images_to_model(imgs, o2)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
