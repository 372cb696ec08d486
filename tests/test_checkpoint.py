"""Checkpoint loading: both layouts, the Hub cache, and every error naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import flashrt
from checkpoints import write_checkpoint
from flashrt.errors import CheckpointError
from flashrt.models import layout

CFG = dict(name="t", cameras=["a"], state_dim=8, action_dim=7, device="cpu")
Q0 = f"{layout.L}.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("pi0", "pi05"):
        for style in ("lerobot", "openpi"):
            f = tmp_path_factory.mktemp(f"{kind}_{style}")
            write_checkpoint(f, kind, style, seed=1)
            out[kind, style] = f
    return out


def load(folder, kind="pi05", **kw):
    return flashrt.load({**CFG, "kind": kind, "checkpoint": str(folder), **kw})


def edit(src, dst, fn):
    """Copy a checkpoint folder, editing its tensors with fn(dict)."""
    dst.mkdir()
    sd = load_file(str(src / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_both_layouts_load_the_same_model(folders, kind):
    rng = np.random.default_rng(0)
    obs = {"images": {"a": rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)}, "state": np.zeros(8, np.float32),
           "prompt_tokens": np.arange(2, 12)}
    noise = rng.normal(size=(10, 32)).astype(np.float32)
    a = load(folders[kind, "lerobot"], kind, normalization={"source": "none"}).infer(obs, noise=noise)["actions"]
    b = load(folders[kind, "openpi"], kind, normalization={"source": "none"}).infer(obs, noise=noise)["actions"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_horizon_and_prompt_length_come_from_the_checkpoint(folders):
    spec = load(folders["pi05", "lerobot"]).spec
    assert spec.action_horizon == 10 and spec.max_prompt_tokens == 48 and not spec.random_weights
    assert "LeRobot" in spec.normalization


def test_missing_tensor(folders, tmp_path):
    f = edit(folders["pi05", "openpi"], tmp_path / "c", lambda sd: sd.pop(Q0))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{Q0}', expected shape \[32, 64\]"):
        load(f)


def test_wrong_shape_names_both_shapes(folders, tmp_path):
    def bad(sd):
        sd[f"{layout.L}.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100)
    f = edit(folders["pi05", "openpi"], tmp_path / "c", bad)
    with pytest.raises(CheckpointError, match=r"layers.1.mlp.down_proj.weight' has shape \[64, 100\], expected \[64, 128\]"):
        load(f)


def test_unexpected_tensor(folders, tmp_path):
    f = edit(folders["pi05", "lerobot"], tmp_path / "c", lambda sd: sd.update({"model.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra_head.weight' with shape \[3\]"):
        load(f)


def test_both_tied_embeddings_absent(folders, tmp_path):
    f = edit(folders["pi05", "lerobot"], tmp_path / "c", lambda sd: sd.pop("model." + layout.LM_HEAD))
    with pytest.raises(CheckpointError, match=r"missing tensor '.*embed_tokens.weight' \(nor the tied paligemma lm_head\)"):
        load(f)


def test_kind_mismatch(folders):
    with pytest.raises(CheckpointError, match="is a Pi0 model .* but the config says kind: pi05"):
        load(folders["pi0", "openpi"], "pi05")
    with pytest.raises(CheckpointError, match="is a Pi0.5 model .* but the config says kind: pi0"):
        load(folders["pi05", "openpi"], "pi0")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load(tmp_path / "junk")


def test_hub_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"'flashrt-test/nothing' is not in the local cache .* HF_HUB_OFFLINE=1"):
        flashrt.checkpoint.resolve("flashrt-test/nothing")


def test_hub_unreachable(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(CheckpointError, match="is not in the local cache .* the Hub cannot be reached"):
        flashrt.checkpoint.resolve("flashrt-test/nothing")


def test_hub_cache_serves_offline(monkeypatch, tmp_path, folders):
    """A pre-filled Hub cache (as in a container volume) loads with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--pi05-tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in folders["pi05", "lerobot"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert flashrt.checkpoint.resolve("acme/pi05-tiny") == snap
    assert load("acme/pi05-tiny").spec.checkpoint == str(snap)


def test_sharded_checkpoint(folders, tmp_path):
    sd = load_file(str(folders["pi0", "openpi"] / "model.safetensors"))
    keys = sorted(sd)
    out = tmp_path / "sharded"
    out.mkdir()
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(out / name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in halves.items() for k in ks}}))
    assert load(out, "pi0").dims == load(folders["pi0", "openpi"], "pi0").dims
