"""Image preprocessing against LeRobot's float resize-with-pad, written out plainly here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashrt.preprocess import image_to_model, images_to_model, resize_with_pad_geometry


def lerobot_style(img_u8: np.ndarray, size: int = 224) -> torch.Tensor:
    """LeRobot: float [0, 1] CHW, bilinear to (int(h/r), int(w/r)), centred zero pad, then x * 2 - 1."""
    x = torch.from_numpy(img_u8).permute(2, 0, 1)[None].float() / 255
    h, w = img_u8.shape[:2]
    r = max(w / size, h / size)
    nh, nw = int(h / r), int(w / r)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False).clamp(0, 1)
    ph, pw = size - nh, size - nw
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return x[0] * 2 - 1


@pytest.mark.parametrize("hw", [(224, 224), (480, 640), (640, 480), (100, 300), (37, 1000), (224, 100), (1, 1), (500, 500)])
def test_matches_lerobot(hw):
    img = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    out = torch.full((3, 224, 224), float("nan"))
    image_to_model(torch.from_numpy(img), out)
    assert not out.isnan().any()  # every element written
    torch.testing.assert_close(out, lerobot_style(img), atol=1e-5, rtol=0)


def test_geometry_and_padding():
    assert resize_with_pad_geometry(480, 640, 224) == (168, 224, 28, 0)
    assert resize_with_pad_geometry(100, 300, 224) == (74, 224, 75, 0)
    img = np.full((480, 640, 3), 255, np.uint8)
    out = torch.empty(3, 224, 224)
    image_to_model(torch.from_numpy(img), out)
    assert (out[:, :28] == -1).all() and (out[:, 28 + 168:] == -1).all() and (out[:, 28:196] == 1).all()


def test_batch_leaves_absent_slots():
    out = torch.full((2, 3, 224, 224), 7.0)
    images_to_model([None, torch.zeros(10, 20, 3, dtype=torch.uint8)], out)
    assert (out[0] == 7).all() and (out[1] == -1).all()


def test_bf16_output():
    img = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    out = torch.empty(3, 224, 224, dtype=torch.bfloat16)
    image_to_model(torch.from_numpy(img), out)
    torch.testing.assert_close(out.float(), lerobot_style(img), atol=1e-2, rtol=0)
