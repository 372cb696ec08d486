"""One inference as launchable work: host staging and upload, then segments, then the result.

`Policy.prepare(obs)` does the host's share (validation, tokenization, copying the inputs into a
pinned staging slot) and, on a GPU, starts uploading the slot to its own device buffers on a side
stream, so the copy overlaps whatever the GPU is running. It returns a `Job`: its `segments` are the
engine's captured segments between an `inputs` segment (waits for that upload, copies it into the
engine's static buffers, draws the noise, preprocesses the images) and an `output` segment (copies
the action chunk to the host once). Launching them in order, on any stream, with anything else
interleaved between them, is one inference; `Job.result()` waits for it.

Two slots alternate, so request n+1 is staged and uploaded while request n still runs. Events keep
them apart: a slot's upload waits (on the GPU) until the job that used the slot before has consumed
its device inputs, and the host reuses a slot's pinned buffers only once their upload is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .engine import Segment

MIN_IMAGE_BYTES = 640 * 480 * 3  # staging buffers per camera start this large (see Slot.stage_image)


class Slot:
    """Pinned host buffers (and, on a GPU, device buffers) for one request's inputs and its output."""

    def __init__(self, n_ints: int, n_floats: int, action_shape: tuple[int, int], n_cams: int, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self.ints = torch.zeros(n_ints, dtype=torch.int64, pin_memory=self.pin)
        self.floats = torch.zeros(n_floats, dtype=torch.float32, pin_memory=self.pin)
        self.actions = torch.zeros(action_shape, dtype=torch.float32, pin_memory=self.pin)
        self.images: list[torch.Tensor | None] = [None] * n_cams  # grow-only uint8 buffers, one per camera
        self.images_dev: list[torch.Tensor | None] = [None] * n_cams
        self.ints_dev = torch.zeros(n_ints, dtype=torch.int64, device=device) if self.pin else None
        self.floats_dev = torch.zeros(n_floats, dtype=torch.float32, device=device) if self.pin else None
        self.uploaded = torch.cuda.Event() if self.pin else None  # the side stream has uploaded this slot
        self.consumed = torch.cuda.Event() if self.pin else None  # a job has copied this slot's inputs out
        self.downloaded = torch.cuda.Event() if self.pin else None  # this slot holds its job's actions
        self.staged = False  # holds a prepared job whose inputs segment has not been launched yet

    def claim(self) -> None:
        """Take the slot for a new job once its pinned buffers are free again."""
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
            # First use (the load's warm-up) or a larger image than this slot has seen. Pinning memory
            # holds up every other thread's CUDA calls (the scheduler's launches) for milliseconds, so
            # the buffers start at least a VGA frame large: a robot's camera frames fit from the start.
            size = max(img.size, MIN_IMAGE_BYTES)
            host = self.images[i] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            if self.pin:
                # The old device buffer may still be read by the job that used this slot before: wait
                # for that job's inputs to be consumed (not for the whole GPU), then replace it.
                self.consumed.synchronize()
                self.images_dev[i] = torch.empty(size, dtype=torch.uint8, device=self.device)
        view = host[: img.size].view(img.shape)
        np.copyto(view.numpy(), img)
        return view

    def upload(self, staged: list, stream: torch.cuda.Stream) -> list:
        """Start copying the staged inputs to this slot's device buffers on `stream`; returns the device
        views of the images (None where a camera is absent)."""
        images = []
        with torch.cuda.stream(stream), torch.inference_mode():  # the slot's buffers are inference tensors
            stream.wait_event(self.consumed)  # the job that used this slot before has read its inputs
            self.ints_dev.copy_(self.ints, non_blocking=True)
            self.floats_dev.copy_(self.floats, non_blocking=True)
            for i, s in enumerate(staged):
                if s is None:
                    images.append(None)
                    continue
                dev = self.images_dev[i][: s.numel()].view(s.shape)
                dev.copy_(s, non_blocking=True)
                images.append(dev)
            self.uploaded.record(stream)
        return images


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
