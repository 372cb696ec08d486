"""Image preprocessing on the device: uint8 HxWx3 of any size -> [3, S, S] in [-1, 1].

openpi's resize-with-pad: scale by max(w/S, h/S) keeping the aspect ratio (bilinear, no antialias,
as LeRobot's torch version), centre it, pad with black (-1 after scaling). The result is written
into the engine's static image buffer for that camera.

`images_to_model` is the op the engine calls (dispatched like the model ops: a native kernel does all
cameras in one launch); `image_to_model` is its per-image reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_with_pad_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an h x w image resized and centred in size x size."""
    ratio = max(w / size, h / size)
    nh, nw = int(h / ratio), int(w / ratio)
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def image_to_model(img: Tensor, out: Tensor) -> None:
    """img: uint8 [H, W, 3] on the device; out: [3, S, S] (model dtype), written in place."""
    size = out.shape[-1]
    h, w = img.shape[:2]
    x = img.permute(2, 0, 1).to(torch.float32)
    if (h, w) == (size, size):
        torch.mul(x, 2 / 255, out=out).sub_(1)  # openpi: x / 255 * 2 - 1
        return
    nh, nw, top, left = resize_with_pad_geometry(h, w, size)
    r = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    out.fill_(-1)
    torch.mul(r, 2 / 255, out=out[:, top:top + nh, left:left + nw]).sub_(1)


def images_to_model(images: list[Tensor | None], out: Tensor) -> None:
    """images[i]: uint8 [H_i, W_i, 3] on the device, or None (slot i left as it is); out [C, 3, S, S]."""
    for i, img in enumerate(images):
        if img is not None:
            image_to_model(img, out[i])
