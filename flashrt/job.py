"""One inference as launchable work: host staging, then segments, then the result.

`Policy.prepare(obs)` does the host's share (validation, tokenization, copying the inputs into a
pinned staging slot) and returns a `Job`: its `segments` are the engine's captured segments between
an `inputs` segment (uploads the slot, generates noise, preprocesses the images on the device) and
an `output` segment (copies the action chunk to the host once). Launching them in order, on any
stream, with anything else interleaved between them, is one inference; `Job.result()` waits for it.

Two staging slots alternate, so the host can prepare request n+1 while the GPU still reads request
n's slot; a slot is reused only after the GPU has finished copying out of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .engine import Segment


class Slot:
    """Pinned host buffers for one request's inputs and its output, plus their completion events."""

    def __init__(self, n_ints: int, n_floats: int, action_shape: tuple[int, int], n_cams: int, device: torch.device):
        self.pin = device.type == "cuda"
        self.ints = torch.zeros(n_ints, dtype=torch.int64, pin_memory=self.pin)
        self.floats = torch.zeros(n_floats, dtype=torch.float32, pin_memory=self.pin)
        self.actions = torch.zeros(action_shape, dtype=torch.float32, pin_memory=self.pin)
        self.images: list[torch.Tensor | None] = [None] * n_cams  # grow-only uint8 buffers, one per camera
        self.uploaded = torch.cuda.Event() if self.pin else None  # the GPU has read this slot's inputs
        self.downloaded = torch.cuda.Event() if self.pin else None  # this slot holds its job's actions
        self.staged = False  # holds a prepared job whose inputs segment has not been launched yet

    def claim(self) -> None:
        """Take the slot for a new job once the GPU has finished reading it."""
        if self.staged:
            raise RuntimeError("two jobs of this policy are prepared and not launched: launch one first")
        if self.uploaded is not None:
            self.uploaded.synchronize()  # normally long done: it was recorded two jobs ago
        self.staged = True

    def stage_image(self, i: int, img: np.ndarray) -> torch.Tensor:
        """Copy an image into camera i's buffer: wire arrays are often read-only or strided views, and
        a pinned source lets the upload run asynchronously."""
        host = self.images[i]
        if host is None or host.numel() < img.size:
            host = self.images[i] = torch.empty(img.size, dtype=torch.uint8, pin_memory=self.pin)
        view = host[: img.size].view(img.shape)
        np.copyto(view.numpy(), img)
        return view


@dataclass
class Job:
    bucket: int
    segments: list[Segment]
    slot: Slot
    launched: int = field(default=0)  # for schedulers that launch segment by segment

    def launch_all(self) -> None:
        """Launch every segment on the current stream."""
        for seg in self.segments:
            seg.launch()
        self.launched = len(self.segments)

    def cancel(self) -> None:
        """Give up a job that will not be launched (refused by admission control, say): frees its slot."""
        if self.launched == 0:
            self.slot.staged = False

    def result(self) -> dict:
        """Wait for the output segment and return {"actions": float32 [H, action_dim]}."""
        if self.slot.downloaded is not None:
            self.slot.downloaded.synchronize()
        return {"actions": self.slot.actions.numpy().copy()}
