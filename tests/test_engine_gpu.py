"""The engine on a GPU: captured graphs and both attention backends against the CPU fp32 result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashrt
from checkpoints import write_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CAMS = ["base_0_rgb", "left_wrist_0_rgb", {"name": "right_wrist_0_rgb", "optional": True}]


def observation(rng, n_tokens, missing=False, size=(224, 224)):
    cams = ["base_0_rgb", "left_wrist_0_rgb"] + ([] if missing else ["right_wrist_0_rgb"])
    return {"images": {c: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in cams},
            "state": rng.normal(size=8).astype(np.float32),
            "prompt_tokens": np.concatenate([[2], rng.integers(3, 500, n_tokens - 1)]).astype(np.int64)}


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
@pytest.mark.parametrize("precision,attention", [("fp32", "sdpa"), ("bf16", "flash_varlen"), ("bf16", "sdpa")])
def test_gpu_graphs_match_cpu_fp32(tmp_path, kind, precision, attention):
    folder = tmp_path / kind
    write_checkpoint(folder, kind, "lerobot", seed=1, horizon=10, max_tokens=48)
    cfg = dict(name="t", kind=kind, checkpoint=str(folder), cameras=CAMS, state_dim=8, action_dim=7, precision="fp32")
    cpu = flashrt.load({**cfg, "device": "cpu"})
    gpu = flashrt.load({**cfg, "device": "cuda", "attention": attention, "precision": precision})
    assert gpu.spec.cuda_graphs and gpu.platform.attention_for(precision) == attention
    tol = 1e-3 if precision == "fp32" else 5e-2
    rng = np.random.default_rng(0)
    for n_tokens, missing, size in [(20, False, (224, 224)), (48, False, (480, 640)), (5, True, (100, 300)),
                                    (33, False, (224, 224))]:
        obs = observation(rng, n_tokens, missing, size)
        noise = rng.normal(size=(10, 32)).astype(np.float32)
        a = cpu.infer(obs, noise=noise)["actions"]
        b = gpu.infer(obs, noise=noise)["actions"]
        err = np.abs(a - b).max()
        assert err <= tol * max(1.0, np.abs(a).max()), f"{n_tokens} tokens, missing={missing}: {err:.2e}"


def test_full_size_graph_replay_equals_eager():
    policy = flashrt.load(dict(name="full", kind="pi05", checkpoint="random", random={"seed": 0, "size": "full"},
                               cameras=["a", "b"], state_dim=8, action_dim=7, precision="bf16"))
    assert policy.spec.cuda_graphs
    rng = np.random.default_rng(0)
    obs = {"images": {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in "ab"},
           "state": rng.normal(size=8).astype(np.float32),
           "prompt_tokens": np.concatenate([[2], rng.integers(3, 257000, 40)]).astype(np.int64)}
    noise = rng.normal(size=(50, 32)).astype(np.float32)
    replayed = policy.infer(obs, noise=noise)["actions"]
    bucket = next(b for b in policy.buckets if b >= 41)
    policy.engine.run_eager(bucket)  # the same segments, eagerly, on the same buffers
    eager = policy.buf.actions.cpu().numpy()
    assert np.isfinite(replayed).all()
    np.testing.assert_allclose(replayed, eager, rtol=0, atol=1e-2 * np.abs(eager).max())
    again = policy.infer(obs, noise=noise)["actions"]
    np.testing.assert_array_equal(replayed, again)  # replay is deterministic
