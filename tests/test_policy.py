"""The policy API on the built-in tiny model: spec, input errors, masking, buckets, reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flashrt
from flashrt import preprocess
from flashrt.errors import InputError, PlatformError
from flashrt.policy import default_buckets


@pytest.fixture(scope="module")
def demo():
    return flashrt.load("configs/demo.yaml")


def obs(rng, **kw):
    o = {"images": {"base_0_rgb": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
                    "left_wrist_0_rgb": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)},
         "state": rng.normal(size=8).astype(np.float32), "prompt": "stack the blocks"}
    o.update(kw)
    return o


def test_spec(demo):
    s = demo.spec
    assert s.kind == "pi05" and s.random_weights and s.device == "cpu" and s.precision == "fp32"
    assert s.cameras == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    assert s.optional_cameras == ("right_wrist_0_rgb",) and s.image_size == (224, 224)
    assert (s.action_horizon, s.action_dim, s.state_dim) == (10, 7, 8) and s.prompt == "text or tokens"
    assert s.to_dict()["prompt_buckets"] == list(s.prompt_buckets) or s.to_dict()["prompt_buckets"] == s.prompt_buckets


def test_infer_and_reset_repeat(demo):
    rng = np.random.default_rng(0)
    o = obs(rng)
    demo.reset()
    a = demo.infer(o)["actions"]
    b = demo.infer(o)["actions"]
    demo.reset()
    c = demo.infer(o)["actions"]
    assert a.shape == (10, 7) and a.dtype == np.float32 and np.isfinite(a).all()
    assert not np.array_equal(a, b)  # fresh noise each call
    np.testing.assert_array_equal(a, c)  # reset restarts the noise sequence


def test_staging_grows_for_larger_images(demo):
    """Each slot starts with room for a VGA frame per camera; larger frames grow it, and the inputs
    staged before and after (tokens, state, noise, the other cameras) are still the ones used."""
    rng = np.random.default_rng(5)
    small, noise = obs(rng), rng.normal(size=(10, 32)).astype(np.float32)
    big = obs(rng, images={"base_0_rgb": rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8),
                           "left_wrist_0_rgb": rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8),
                           "right_wrist_0_rgb": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)})
    before = demo.infer(small, noise=noise)["actions"]
    sizes = [s.host.numel() for s in demo._slots]
    grown = [demo.infer(big, noise=noise)["actions"] for _ in range(2)]  # both slots
    assert all(s.host.numel() > n for s, n in zip(demo._slots, sizes))
    # The images the model saw are the ones sent, each read from its own place in the grown slot.
    expect = torch.zeros_like(demo.buf.images)
    preprocess.images_to_model([torch.from_numpy(big["images"][c]) for c in demo.spec.cameras], expect)
    torch.testing.assert_close(demo.buf.images, expect, rtol=0, atol=0)
    np.testing.assert_array_equal(grown[0], grown[1])
    np.testing.assert_array_equal(demo.infer(small, noise=noise)["actions"], before)
    fresh = flashrt.load("configs/demo.yaml")
    np.testing.assert_array_equal(fresh.infer(big, noise=noise)["actions"], grown[0])


def test_inputs_change_the_output(demo):
    rng = np.random.default_rng(1)
    o = obs(rng)
    noise = rng.normal(size=(10, 32)).astype(np.float32)
    base = demo.infer(o, noise=noise)["actions"]
    for change in ({"prompt": "open the drawer"}, {"state": o["state"] + 0.5},
                   {"images": {**o["images"], "base_0_rgb": 255 - o["images"]["base_0_rgb"]}},
                   {"images": {**o["images"], "right_wrist_0_rgb": o["images"]["left_wrist_0_rgb"]}}):
        assert np.abs(demo.infer({**o, **change}, noise=noise)["actions"] - base).max() > 1e-4, change


def test_default_prompt_and_tokens(demo):
    rng = np.random.default_rng(2)
    o = obs(rng)
    del o["prompt"]
    assert demo.infer(o)["actions"].shape == (10, 7)  # the config's default prompt
    assert demo.infer({**o, "prompt_tokens": np.array([2, 40, 41, 42])})["actions"].shape == (10, 7)


@pytest.mark.parametrize("change,message", [
    ({"images": {"left_wrist_0_rgb": np.zeros((224, 224, 3), np.uint8)}}, "camera 'base_0_rgb' is missing"),
    ({"images": {"base_0_rgb": np.zeros((8, 8, 3), np.uint8), "left_wrist_0_rgb": np.zeros((8, 8, 3), np.uint8),
                 "top": np.zeros((8, 8, 3), np.uint8)}}, "unknown camera 'top'"),
    ({"images": {"base_0_rgb": np.zeros((8, 8, 3), np.float32), "left_wrist_0_rgb": np.zeros((8, 8, 3), np.uint8)}},
     r"images\['base_0_rgb'\] must be uint8 \[H, W, 3\], got float32 \[8, 8, 3\]"),
    ({"images": {"base_0_rgb": np.zeros((8, 8), np.uint8), "left_wrist_0_rgb": np.zeros((8, 8, 3), np.uint8)}},
     r"must be uint8 \[H, W, 3\], got uint8 \[8, 8\]"),
    ({"images": {"base_0_rgb": [[1]], "left_wrist_0_rgb": np.zeros((8, 8, 3), np.uint8)}}, "got list"),
    ({"images": "cam"}, "observation.images must be a mapping"),
    ({"state": np.zeros(7)}, r"state must have shape \[8\], got \[7\]"),
    ({"state": None}, "state is missing"),
    ({"state": ["a"] * 8}, "state must be 8 numbers"),
    ({"state": np.full(8, np.nan)}, "NaN or infinite"),
    ({"prompt": 3}, "prompt must be a string, got int"),
    ({"prompt": "x" * 300}, "the prompt is .* tokens; this model takes at most 200"),
    ({"prompt_tokens": np.array([1.5, 2.0])}, "prompt_tokens must be a non-empty 1-D int array"),
    ({"prompt_tokens": np.array([2, 99999])}, r"ids must be in \[0, 512\)"),
])
def test_bad_inputs_are_named(demo, change, message):
    rng = np.random.default_rng(3)
    with pytest.raises(InputError, match=message):
        demo.infer(obs(rng, **change))
    assert demo.infer(obs(rng))["actions"].shape == (10, 7)  # still serving


def test_not_a_mapping(demo):
    with pytest.raises(InputError, match="observation must be a mapping"):
        demo.infer([1, 2])


def test_text_prompt_needs_a_tokenizer():
    p = flashrt.load(dict(name="t", kind="pi0", checkpoint="random", cameras=["a"], state_dim=4, action_dim=4,
                          device="cpu"))
    rng = np.random.default_rng(0)
    o = {"images": {"a": rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)}, "state": np.zeros(4)}
    assert p.spec.prompt == "tokens"
    with pytest.raises(InputError, match="no tokenizer .* send prompt_tokens"):
        p.infer({**o, "prompt": "hi"})
    assert p.infer({**o, "prompt_tokens": [2, 5, 6]})["actions"].shape == (50, 4)


def test_unsupported_precision_is_a_clear_error():
    with pytest.raises(PlatformError, match="precision 'fp16' is not supported on cpu"):
        flashrt.load(dict(name="t", kind="pi0", checkpoint="random", cameras=["a"], state_dim=4, action_dim=4,
                          device="cpu", precision="fp16"))


def test_buckets():
    assert default_buckets(200) == [32, 48, 64, 96, 128, 200]
    assert default_buckets(48) == [32, 48]
    assert default_buckets(20) == [20]


def test_read_only_wire_arrays(demo, recwarn):
    """Arrays decoded zero-copy from a message are read-only and may be strided: accepted as they are."""
    rng = np.random.default_rng(4)
    o = obs(rng)
    raw = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    ro = np.frombuffer(raw.tobytes(), np.uint8).reshape(raw.shape)
    assert not ro.flags.writeable
    o["images"] = {"base_0_rgb": ro, "left_wrist_0_rgb": raw[:, ::-1]}
    noise = rng.normal(size=(10, 32)).astype(np.float32)
    a = demo.infer(o, noise=noise)["actions"]
    b = demo.infer({**o, "images": {"base_0_rgb": raw.copy(), "left_wrist_0_rgb": raw[:, ::-1].copy()}}, noise=noise)["actions"]
    np.testing.assert_array_equal(a, b)
    assert not [w for w in recwarn.list if "not writable" in str(w.message)]


def test_jobs_interleave_with_double_buffered_staging(demo):
    """Two jobs prepared ahead, launched segment by segment interleaved with another model's job."""
    rng = np.random.default_rng(5)
    other = flashrt.load(dict(name="o", kind="pi0", checkpoint="random", cameras=["a"], state_dim=4, action_dim=4,
                              device="cpu", random={"seed": 1}))
    o1, o2 = obs(rng), obs(rng, prompt="other task")
    n1, n2 = (rng.normal(size=(10, 32)).astype(np.float32) for _ in range(2))
    want1, want2 = demo.infer(o1, noise=n1)["actions"], demo.infer(o2, noise=n2)["actions"]
    o3 = {"images": {"a": rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)}, "state": np.zeros(4),
          "prompt_tokens": [2, 9]}
    n3 = rng.normal(size=(50, 32)).astype(np.float32)
    want3 = other.infer(o3, noise=n3)["actions"]
    j1, j2 = demo.prepare(o1, noise=n1), demo.prepare(o2, noise=n2)
    with pytest.raises(RuntimeError, match="prepared and not launched"):
        demo.prepare(o1)
    j3 = other.prepare(o3, noise=n3)
    assert [s.name for s in j1.segments][:2] == ["inputs", "vision"] and j1.segments[2].name.startswith("prefix")
    # the tiny model's 2 layers: prefix_segments (3) is capped at the depth
    assert [s.name[:7] for s in j1.segments[2:5]] == ["prefix0", "prefix1", "step0[9"]
    assert j1.segments[-1].name == "output" and len(j1.segments) == 2 + 2 + 10 + 1
    import torch
    with torch.inference_mode():
        for a, b in zip(j1.segments, j3.segments):  # alternate segments of the two models
            a.launch()
            b.launch()
        for s in j3.segments[len(j1.segments):]:
            s.launch()
        np.testing.assert_array_equal(j1.result()["actions"], want1)
        j2.launch_all()
    np.testing.assert_array_equal(j2.result()["actions"], want2)
    np.testing.assert_array_equal(j3.result()["actions"], want3)
