"""Quantization math (scales, rounding, saturation), the calibration cache, and the accuracy guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashrt
from checkpoints import write_checkpoint
from flashrt import quant
from flashrt.errors import AccuracyError, ConfigError

torch.manual_seed(0)


def test_int8_weights_per_channel():
    w = torch.randn(64, 96) * torch.linspace(0.01, 10, 64)[:, None]  # channels of very different ranges
    q, s = quant.quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and s.shape == (64,)
    torch.testing.assert_close(s, w.abs().amax(1) / 127)
    assert (q.abs().amax(1) == 127).all()  # each channel's largest value uses the full range
    err = (quant.dequantize_weight(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step


def test_fp8_weights_and_saturation():
    w = torch.randn(32, 64)
    q, s = quant.quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    rel = ((quant.dequantize_weight(q, s) - w).abs() / w.abs().clamp(min=1e-3)).max()
    assert rel <= 2**-4 + 1e-6  # E4M3: 3 mantissa bits
    x = torch.tensor([[1.0, -1000.0, 5000.0, float("inf")]])
    y = quant.quantize_fp8(x, torch.tensor([1.0])).float()
    assert torch.equal(y, torch.tensor([[1.0, -448.0, 448.0, 448.0]]))  # clips, never NaN


def test_per_token_int8():
    x = torch.randn(5, 16) * torch.tensor([1.0, 100.0, 0.01, 1.0, 0.0])[:, None]
    q, s = quant.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (5, 1) and torch.isfinite(s).all()
    assert (q[:4].abs().amax(1) == 127).all() and (q[4] == 0).all()
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_fp8_weights_per_tensor():
    w = torch.randn(32, 64) * 3
    q, s = quant.quantize_weight(w, "fp8", per_channel=False)
    assert s.shape == (1,) and float(s) == pytest.approx(float(w.abs().max()) / 448)
    assert float(q.float().abs().max()) == 448  # the largest weight uses the full range


@pytest.mark.parametrize("kind,per_channel,tol", [("int8", True, 0.02), ("fp8", True, 0.06), ("fp8", False, 0.06)])
@pytest.mark.parametrize("rows", [1, 7, 50])  # int8 pads fewer than 17 rows for torch._int_mm
def test_quantized_linear_close_to_float(kind, per_channel, tol, rows):
    w, b = torch.randn(48, 64) / 8, torch.randn(48)
    x = torch.randn(rows, 64)
    qw = quant.QuantWeight.make(w, b, kind, float(x.abs().max()) if kind == "fp8" else None, per_channel=per_channel)
    assert qw.w_scale.shape == ((1, 48) if per_channel else ())
    out = quant.linear(x, qw)
    ref = torch.nn.functional.linear(x, w, b)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()) < tol
    if kind == "fp8":  # an input its producer already quantized gives the same result
        torch.testing.assert_close(quant.linear(quant.quantize_fp8(x, qw.inv_act_scale), qw), out)


def test_recorder_tracks_amax_without_changing_results():
    w = torch.randn(8, 4)
    r = quant.Recorder(w, torch.zeros(1))
    x1, x2 = torch.randn(3, 4), 7 * torch.randn(3, 4)
    torch.testing.assert_close(quant.linear(x1, r), x1 @ w.t())
    quant.linear(x2, r)
    assert float(r.amax) == pytest.approx(float(torch.cat([x1, x2]).abs().max()))


def test_streamed_names_the_weights_a_gemm_reads():
    w = torch.randn(8, 4)
    qw = quant.QuantWeight.make(w, None, "int8", None)
    assert quant.streamed(w) is w and quant.streamed(qw) is qw.q
    assert quant.streamed(quant.Recorder(w, torch.zeros(1))) is w


def test_recorder_skips_padding_rows():
    """Rows at or past valid_rows (the prefix's bucket padding, which may hold anything) never reach amax."""
    w = torch.randn(8, 4)
    r = quant.Recorder(w, torch.zeros(1), torch.tensor([2]))
    x = torch.randn(4, 4)
    x[2], x[3] = float("nan"), 1e30
    quant.linear(x, r)
    assert float(r.amax) == pytest.approx(float(x[:2].abs().max()))


def test_cache_keys_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHRT_CACHE", str(tmp_path))
    base = dict(checkpoint="x", weights=[("model.safetensors", 10, 5)], steps=10, platform="orin")
    k = quant.cache_key(**base)
    assert k == quant.cache_key(**dict(reversed(list(base.items()))))  # order does not matter
    for change in ({"weights": [("model.safetensors", 10, 6)]}, {"steps": 5}, {"platform": "thor"}):
        assert quant.cache_key(**{**base, **change}) != k
    assert quant.load_cached(k) is None
    quant.store(k, {"amax": {"a": 1.5}})
    assert quant.load_cached(k) == {"amax": {"a": 1.5}}
    (tmp_path / "calibration" / f"{k}.json").write_text("{broken")
    assert quant.load_cached(k) is None  # a damaged file is recomputed, not trusted


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHRT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, "pi05", "openpi", seed=2)
    return dict(name="q", kind="pi05", checkpoint=str(folder), cameras=["a", "b"], state_dim=8, action_dim=7,
                device="cpu", tokenizer="bytes", prompt="pick", max_prompt_tokens=120, calibration={"count": 3})


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_policy_calibrates_caches_and_guards(tiny, precision):
    p = flashrt.load({**tiny, "precision": precision})
    c = p.spec.calibration
    assert p.spec.precision == precision and not c["cached"] and c["cosine"] >= 0.99
    assert isinstance(p.model.vlm[0].qkv, quant.QuantWeight) and isinstance(p.model.siglip.layers[0].fc1_w, quant.QuantWeight)
    vision_qkv = p.model.siglip.layers[0].qkv_w
    if precision == "fp8":  # SigLIP's attention projections stay bf16 unless keep_bf16 says otherwise
        assert isinstance(vision_qkv, torch.Tensor) and p.model.siglip.layers[0].qkv_b is not None
    else:
        assert isinstance(vision_qkv, quant.QuantWeight) and p.model.siglip.layers[0].qkv_b is None
    assert c["kept_bf16"] == list(quant.KEEP_BF16[precision])
    rng = np.random.default_rng(0)
    obs = {"images": {k: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for k in "ab"},
           "state": np.zeros(8, np.float32)}
    assert np.isfinite(p.infer(obs)["actions"]).all()
    again = flashrt.load({**tiny, "precision": precision})
    assert again.spec.calibration["cached"] and again.spec.calibration["key"] == c["key"]
    fresh = flashrt.load({**tiny, "precision": precision, "calibration": {"count": 3, "refresh": True}})
    assert not fresh.spec.calibration["cached"]
    with pytest.raises(AccuracyError, match=rf"{precision} action chunk against bf16 .* cosine [01]\.\d{{6}} < calibration.min_cosine 1.0 \(max relative error"):
        flashrt.load({**tiny, "precision": precision, "calibration": {"count": 3, "min_cosine": 1.0}})


def test_calibration_ignores_what_padding_rows_hold(tiny, monkeypatch):
    """On a GPU the prefix's attention leaves its padding rows unwritten, so they hold whatever the
    memory held before (NaN made FP8 calibration refuse to serve at random; a huge value would
    inflate the scales). Filling those rows with garbage must change no recorded scale. (Here the
    garbage is finite: the CPU's masked SDPA would spread a NaN from the padded K/V rows to every
    row, which the GPU's varlen attention never reads.)"""
    from flashrt.ops import torch_ops

    clean = flashrt.load({**tiny, "precision": "fp8"}).spec.calibration
    clean_amax = quant.load_cached(clean["key"])["amax"]  # read now: the refresh below rewrites the file
    sdpa = torch_ops.attention_sdpa

    def poisoned(q, k_cache, v_cache, key_mask, quant=None):
        out = sdpa(q, k_cache, v_cache, key_mask, quant)
        if q.shape[0] == key_mask.shape[0]:  # the prefix: one query token per cache row
            out.view(q.shape[0], -1)[int(key_mask.sum()):] = 1e4
        return out

    monkeypatch.setattr(torch_ops, "attention_sdpa", poisoned)
    dirty = flashrt.load({**tiny, "precision": "fp8", "calibration": {"count": 3, "refresh": True}}).spec.calibration
    assert dirty["cosine"] >= 0.99 and not dirty["cached"] and dirty["key"] == clean["key"]
    assert quant.load_cached(dirty["key"])["amax"] == clean_amax


def test_fp8_weight_scales_setting(tiny):
    p = flashrt.load({**tiny, "precision": "fp8", "calibration": {"count": 3, "fp8_weight_scales": "channel"}})
    assert p.model.vlm[0].qkv.w_scale.dim() == 2 and p.spec.calibration["cosine"] >= 0.99
    assert flashrt.load({**tiny, "precision": "fp8", "calibration": {"count": 3}}).model.vlm[0].qkv.w_scale.dim() == 0
    with pytest.raises(ConfigError, match=r"calibration.fp8_weight_scales: expected 'tensor' or 'channel', got 'row'"):
        flashrt.load({**tiny, "precision": "fp8", "calibration": {"fp8_weight_scales": "row"}})


def test_keep_bf16_leaves_the_named_projections_unquantized(tiny):
    p = flashrt.load({**tiny, "precision": "fp8", "calibration": {"count": 3, "keep_bf16": ["vision.*", "expert.*.o"]}})
    assert all(isinstance(L.qkv_w, torch.Tensor) for L in p.model.siglip.layers)
    assert isinstance(p.model.vlm[0].o, quant.QuantWeight) and isinstance(p.model.expert[0].qkv, quant.QuantWeight)
    assert all(isinstance(L.o, torch.Tensor) for L in p.model.expert)
    assert p.spec.calibration["cosine"] >= 0.99
    plain = flashrt.load({**tiny, "precision": "fp8", "calibration": {"count": 3}}).spec.calibration
    assert plain["key"] != p.spec.calibration["key"]  # a different set of scales, cached apart
    everything = flashrt.load({**tiny, "precision": "fp8", "calibration": {"count": 3, "keep_bf16": []}})
    assert all(isinstance(L.qkv_w, quant.QuantWeight) for L in everything.model.siglip.layers)  # [] overrides the default
    assert everything.spec.calibration["key"] not in (plain["key"], p.spec.calibration["key"])
    with pytest.raises(ConfigError, match=r"keep_bf16 \['\*'\] keeps every projection in bf16"):
        flashrt.load({**tiny, "precision": "int8", "calibration": {"keep_bf16": ["*"]}})


def test_changed_checkpoint_invalidates_the_cache(tiny):
    first = flashrt.load({**tiny, "precision": "fp8"}).spec.calibration
    weights = (flashrt.checkpoint.Path(tiny["checkpoint"]) / "model.safetensors")
    st = weights.stat()
    import os
    os.utime(weights, (st.st_atime, st.st_mtime + 10))
    second = flashrt.load({**tiny, "precision": "fp8"}).spec.calibration
    assert second["key"] != first["key"] and not second["cached"]


def test_skinny_weight_layout_and_torch_path():
    """The skinny GEMM's tiling is a pure re-layout (untiling gives the weight back), each lane's
    fragment holds what mma.sync expects, and a SkinnyWeight run by ops without the kernel returns
    split-K partials that sum to x @ w.T."""
    from flashrt.ops import torch_ops

    w = torch.randn(128, 256, dtype=torch.bfloat16)
    t = quant.tile_skinny_weight(w, 4)
    assert torch.equal(quant.untile_skinny_weight(t), w)
    # tile 0, k step 0, warp 1 (features 16..31), lane g = 3, c = 2: a0 = w[16 + g, 2c:2c+2],
    # a1 = w[16 + g + 8, 2c:2c+2], a2 and a3 the same at k + 8
    f = t[0, 0, 1, 3, 2]
    assert torch.equal(f.flatten(), torch.stack([w[19, 4], w[19, 5], w[27, 4], w[27, 5],
                                                 w[19, 12], w[19, 13], w[27, 12], w[27, 13]]))
    sw = quant.SkinnyWeight(t, splits=4, ksplit=2)
    assert sw.shape == (128, 256)
    x = torch.randn(50, 256, dtype=torch.bfloat16)
    part = quant.linear(x, sw, ops=torch_ops)
    assert part.shape == (4, 50, 128) and part.dtype == torch.float32
    torch.testing.assert_close(part.sum(0), x.float() @ w.float().T, rtol=1e-5, atol=1e-4)
    assert quant.streamed(sw) is t
    with pytest.raises(ValueError, match="does not tile"):
        quant.tile_skinny_weight(torch.zeros(100, 256, dtype=torch.bfloat16), 4)
