"""The engine against the plain fp32 reference (tests/reference_pi.py): same weights, inputs, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashrt
from checkpoints import ACTION_STATS, STATE_STATS, write_checkpoint
from reference_pi import sample_actions

CAMERAS = ["base_0_rgb", "left_wrist_0_rgb", {"name": "right_wrist_0_rgb", "optional": True}]
H, MAX_TOKENS = 10, 48


def normalize_state(x, style, kind):
    s = {k: np.asarray(v, np.float64) for k, v in STATE_STATS.items()}
    if kind == "pi0":
        return (x - s["mean"]) / (s["std"] + (1e-8 if style == "lerobot" else 1e-6))
    if style == "lerobot":
        return 2 * (x - s["q01"]) / (s["q99"] - s["q01"]) - 1
    return (x - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) * 2 - 1


def unnormalize_actions(y, style, kind):
    s = {k: np.asarray(v, np.float64) for k, v in ACTION_STATS.items()}
    if kind == "pi0":
        return y * (s["std"] + (1e-8 if style == "lerobot" else 1e-6)) + s["mean"]
    if style == "lerobot":
        return (y + 1) * (s["q99"] - s["q01"]) / 2 + s["q01"]
    return (y + 1) / 2 * (s["q99"] - s["q01"] + 1e-6) + s["q01"]


@pytest.fixture(scope="module", params=[(k, s) for k in ("pi0", "pi05") for s in ("lerobot", "openpi")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request, tmp_path_factory):
    kind, style = request.param
    folder = tmp_path_factory.mktemp(f"{kind}_{style}")
    sd = write_checkpoint(folder, kind, style, seed=3, horizon=H, max_tokens=MAX_TOKENS)
    policy = flashrt.load(dict(name="t", kind=kind, checkpoint=str(folder), cameras=CAMERAS, state_dim=8,
                               action_dim=7, device="cpu", precision="fp32"))
    return kind, style, sd, policy


@pytest.mark.parametrize("n_tokens,missing_camera", [(20, False), (48, False), (7, True)])
def test_matches_reference(model, n_tokens, missing_camera):
    kind, style, sd, policy = model
    rng = np.random.default_rng(n_tokens)
    imgs = {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in ("base_0_rgb", "left_wrist_0_rgb")}
    if not missing_camera:
        imgs["right_wrist_0_rgb"] = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    state = rng.normal(size=8).astype(np.float32)
    tokens = np.concatenate([[2], rng.integers(3, 500, n_tokens - 1)]).astype(np.int64)
    noise = rng.normal(size=(H, 32)).astype(np.float32)

    ours = policy.infer({"images": imgs, "state": state, "prompt_tokens": tokens}, noise=noise)["actions"]

    ref_images, ref_masks = [], []
    for cam in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"):
        if cam in imgs:
            ref_images.append(torch.from_numpy(imgs[cam]).permute(2, 0, 1)[None].float() / 255 * 2 - 1)
            ref_masks.append(True)
        else:
            ref_images.append(-torch.ones(1, 3, 224, 224))
            ref_masks.append(False)
    padded = np.zeros(MAX_TOKENS, np.int64)
    padded[:n_tokens] = tokens
    state32 = np.zeros(32)
    state32[:8] = normalize_state(state.astype(np.float64), style, kind)
    with torch.no_grad():
        ref = sample_actions(sd, kind, ref_images, ref_masks, torch.from_numpy(padded),
                             torch.arange(MAX_TOKENS) < n_tokens, torch.tensor(state32, dtype=torch.float32),
                             torch.from_numpy(noise), num_steps=10, vision_heads=2, heads=2)
    ref = unnormalize_actions(ref[:, :7].double().numpy(), style, kind)
    assert ours.shape == (H, 7) and ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    print(f"{kind}-{style} err {err:.2e} scale {np.abs(ref).max():.2f}")
    assert err <= 1e-4, f"max abs error {err:.2e} against the reference"
    # The check has teeth: a different noise gives a clearly different chunk.
    other = policy.infer({"images": imgs, "state": state, "prompt_tokens": tokens}, noise=noise + 0.5)["actions"]
    assert np.abs(other - ref).max() > 1e-2
