"""One inference as launchable work: host staging and upload, then segments, then the result.

`Policy.prepare(obs)` does the host's share (validation, tokenization, the noise, copying the inputs
into a pinned staging slot) and, on a GPU, starts uploading the slot to its device twin on a side
stream, so the copy overlaps whatever the GPU is running. It returns a `Job`: its `segments` are the
engine's captured segments between an `inputs` segment (waits for that upload, copies the ints and
floats into the engine's static buffers, preprocesses the images) and an `output` segment (copies
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

MIN_IMAGE_BYTES = 640 * 480 * 3  # staging room per camera from the start (see Slot.claim)


def _align(n: int) -> int:
    return (n + 15) // 16 * 16


class Slot:
    """Pinned host memory (and, on a GPU, its device twin) for one request's inputs and its output.

    The inputs are one byte buffer, [ints | floats | image 0 | image 1 | ...], each part 16-byte
    aligned, so a request's upload is one copy and the ints and floats reach the engine's static
    buffers in one more: every copy a job launches costs ~30 us of host time before the GPU can
    start, whatever its size."""

    def __init__(self, n_ints: int, n_floats: int, action_shape: tuple[int, int], n_cams: int, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self._n_ints, self._n_floats = n_ints, n_floats
        self.head = _align(n_ints * 8 + n_floats * 4)  # the ints and floats: what the engine copies in
        self.actions = torch.zeros(action_shape, dtype=torch.float32, pin_memory=self.pin)
        self.uploaded = torch.cuda.Event() if self.pin else None  # the side stream has uploaded this slot
        self.consumed = torch.cuda.Event() if self.pin else None  # a job has copied this slot's inputs out
        self.downloaded = torch.cuda.Event() if self.pin else None  # this slot holds its job's actions
        self.staged = False  # holds a prepared job whose inputs segment has not been launched yet
        self._allocate(self.head + n_cams * _align(MIN_IMAGE_BYTES))

    def _allocate(self, size: int) -> None:
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=self.pin)
        self.dev = torch.zeros(size, dtype=torch.uint8, device=self.device) if self.pin else None
        self.ints, self.floats = split_inputs(self.host, self._n_ints, self._n_floats)

    def claim(self, images: list[np.ndarray | None]) -> None:
        """Take the slot for a new job, with room for `images`, once its pinned memory is free again."""
        if self.staged:
            raise RuntimeError("two jobs of this policy are prepared and not launched: launch one first")
        if self.uploaded is not None:
            self.uploaded.synchronize()  # normally long done: it was recorded two jobs ago
        _, need = self._layout(images)
        if need > self.host.numel():
            # Larger images than this slot has seen (the first use is the load's warm-up). Pinning
            # memory holds up every other thread's CUDA calls (the scheduler's launches) for
            # milliseconds, so the slot starts with room for a VGA frame per camera and grows by
            # half again: a robot's camera frames fit from the start. The old device buffer may
            # still be read by the job that used this slot before: wait for that job's inputs to be
            # consumed (not for the whole GPU) before replacing it.
            if self.pin:
                self.consumed.synchronize()
            self._allocate(max(need, self.host.numel() * 3 // 2))
        self.staged = True

    def stage(self, images: list[np.ndarray | None], stream: torch.cuda.Stream | None) -> list:
        """Copy the images in after the ints and floats (already written) and, on a GPU, start the
        upload of everything on `stream`. Returns each image as the inputs segment reads it: a view
        of the device twin on a GPU, of the host buffer otherwise (None where a camera is absent)."""
        starts, end = self._layout(images)
        for img, at in zip(images, starts):
            if img is not None:  # wire arrays may be read-only or strided
                np.copyto(self.host[at:at + img.size].view(img.shape).numpy(), img)
        if self.pin:
            with torch.cuda.stream(stream), torch.inference_mode():  # the slot's buffers are inference tensors
                stream.wait_event(self.consumed)  # the job that used this slot before has read its inputs
                self.dev[:end].copy_(self.host[:end], non_blocking=True)
                self.uploaded.record(stream)
        src = self.dev if self.pin else self.host
        return [None if img is None else src[at:at + img.size].view(img.shape) for img, at in zip(images, starts)]

    def _layout(self, images: list[np.ndarray | None]) -> tuple[list[int | None], int]:
        """Where each image starts in the buffer (None: absent), and where the inputs end."""
        starts, at = [], self.head
        for img in images:
            starts.append(None if img is None else at)
            at += 0 if img is None else _align(img.size)
        return starts, at

    def inputs(self) -> torch.Tensor:
        """The ints and floats, where the inputs segment copies them from."""
        return (self.dev if self.pin else self.host)[: self.head]


def split_inputs(buf: torch.Tensor, n_ints: int, n_floats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int64 and float32 views at the front of an inputs byte buffer (the slots' and the engine's)."""
    return buf[: n_ints * 8].view(torch.int64), buf[n_ints * 8: n_ints * 8 + n_floats * 4].view(torch.float32)


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
