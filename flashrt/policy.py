"""A loaded policy: config -> weights on the device -> captured engine; observations -> action chunks.

`Policy.infer(obs)` validates the observation, writes it into the engine's static buffers (the
prompt tokenized and the noise drawn on the host, tokens, state, noise and images staged in pinned
memory and uploaded in one transfer, the images resized on the device), replays the engine, and
copies the action chunk to the host once.

The serving path is split for schedulers: `prepare(obs)` (host work) returns a `Job` whose segments
are launched in order (see job.py); `infer(obs)` does both in one call.

Observation: {"images": {camera: uint8 [H, W, 3]}, "state": float [state_dim],
              "prompt": str (optional), "prompt_tokens": int ids (optional, instead of prompt)}
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import calibrate, checkpoint, hardware, normalize, ops, tokenizer
from .config import ModelConfig
from .engine import Engine, Segment
from .errors import ConfigError, InputError
from .job import Job, Slot, split_inputs
from .models import gemma, layout
from .models.pi import PiModel

# Activation dtype per precision (fp8/int8 quantize the big linears' weights and inputs; see quant.py).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16,
          "int8": torch.bfloat16}
DEFAULT_MAX_TOKENS = {"pi0": 48, "pi05": 200}
DEFAULT_HORIZON = 50


@dataclass(frozen=True)
class PolicySpec:
    name: str
    kind: str
    cameras: tuple[str, ...]
    optional_cameras: tuple[str, ...]
    image_size: tuple[int, int]
    state_dim: int
    action_horizon: int
    action_dim: int
    prompt: str  # "text or tokens" with a tokenizer, else "tokens"
    default_prompt: str | None
    max_prompt_tokens: int
    prompt_buckets: tuple[int, ...]
    num_steps: int
    precision: str
    device: str
    platform: str
    cuda_graphs: bool
    random_weights: bool
    checkpoint: str
    normalization: str
    calibration: dict | None = None  # fp8/int8: cache key, cosine to bf16 on the probe observation


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_buckets(max_tokens: int) -> list[int]:
    """Prompt-length buckets: 32, 48, 64, 96, 128, 192, ... below max_tokens, then max_tokens itself
    (a bucket within 15% of the maximum is dropped: it would save little and cost a capture)."""
    sizes = [s for base in (32, 64, 128, 256, 512) for s in (base, base * 3 // 2)]
    return [s for s in sizes if s * 1.15 < max_tokens] + [max_tokens]


class Policy:
    def __init__(self, config: ModelConfig):
        t0 = time.perf_counter()
        self.config = config
        overrides: dict = {}
        if config.kernels == "torch":
            overrides["native_kernels"] = False
        if config.attention != "auto":
            overrides.update(attention=config.attention, _attention_forced=True)
        plat = hardware.for_config(config.device, **overrides)
        self.platform = plat
        precision = plat.resolve_precision(config.precision)
        self.device = torch.device(plat.device)
        dtype = DTYPES[precision]
        kind = config.kind

        folder: Path | None = None
        info = checkpoint.CheckpointInfo()
        if config.checkpoint == "random":
            dims = layout.preset(kind, config.random.size)
            source = checkpoint.RandomSource(dims, config.random.seed)
        else:
            folder = checkpoint.resolve(config.checkpoint, config.revision)
            source = checkpoint.SafetensorsSource(folder, kind)
            info = checkpoint.read_info(folder)
            dims = layout.infer_dims(kind, source.shapes)
            checkpoint.check_layout(source, dims, str(folder))
        horizon = config.action_horizon or info.action_horizon or DEFAULT_HORIZON
        max_tokens = config.max_prompt_tokens or info.max_prompt_tokens or DEFAULT_MAX_TOKENS[kind]
        buckets = config.prompt_buckets or default_buckets(max_tokens)
        if config.state_dim > dims.action_dim or config.action_dim > dims.action_dim:
            raise ConfigError(f"{config.name}: state_dim/action_dim must be <= the model's {dims.action_dim}")

        self.tokenizer = tokenizer.load(config.tokenizer, folder)
        self.discrete_state = kind == "pi05" and config.discrete_state is not False
        norm = normalize.load(config.normalization, folder, kind, info.normalization_mapping,
                              config.state_dim, config.action_dim)
        self.norm = norm

        with torch.inference_mode():
            model = PiModel(dims, lambda k: source.get(k, self.device), self.device, dtype,
                            ops.for_platform(plat), horizon, config.num_steps)
            if precision == "bf16":  # (fp8/int8 quantize these weights instead)
                gemma.tile_skinny(model.ops, model.expert, horizon)
            model.state_norm[:, : config.state_dim] = torch.from_numpy(norm.state.rows())
            model.action_unnorm[:, : config.action_dim] = torch.from_numpy(norm.actions.rows())
            if plat.is_cuda:
                torch.cuda.synchronize(self.device)
            self.load_s = time.perf_counter() - t0
            cams = config.cameras
            buf = model.buffers(len(cams), buckets, config.action_dim, plat.attention_for(precision))
            self.model, self.buf = model, buf
            self._stage_inputs(len(cams), buckets[-1], horizon, dims)
            self.engine = Engine(model, buf, buckets, self.device, config.cuda_graphs and plat.cuda_graphs,
                                 config.prefix_segments)

        self.dims, self.buckets = dims, buckets
        self._tokens_per_image = dims.vision.tokens
        self.spec = PolicySpec(
            name=config.name, kind=kind, cameras=tuple(c.name for c in cams),
            optional_cameras=tuple(c.name for c in cams if c.optional),
            image_size=(dims.vision.image, dims.vision.image), state_dim=config.state_dim,
            action_horizon=horizon, action_dim=config.action_dim,
            prompt="text or tokens" if self.tokenizer else "tokens", default_prompt=config.prompt,
            max_prompt_tokens=max_tokens, prompt_buckets=tuple(buckets), num_steps=config.num_steps,
            precision=precision, device=str(self.device), platform=plat.name, cuda_graphs=False, random_weights=config.checkpoint == "random",
            checkpoint=config.checkpoint if folder is None else str(folder), normalization=norm.source)
        self._noise = np.random.default_rng(config.random.seed)  # reseeded by reset()
        calib = None
        if precision in ("fp8", "int8"):
            calib = calibrate.prepare(self, precision, dict(
                checkpoint=config.checkpoint, revision=config.revision, weights=_fingerprint(folder),
                random=dataclasses.asdict(config.random) if folder is None else None, kind=kind,
                dims=dataclasses.asdict(dims),
                horizon=horizon, steps=config.num_steps, buckets=buckets, cameras=self.spec.cameras,
                state_dim=config.state_dim, normalization=norm.source, platform=plat.name,
                capability=plat.capability, calibration=config.calibration.observations, count=config.calibration.count))
        with torch.inference_mode():
            self.engine.capture()
        if calib is not None:
            calib = calibrate.check(self, precision, calib)
        self.spec = dataclasses.replace(self.spec, cuda_graphs=self.engine.graphed, calibration=calib)
        self.reset()
        self.first_call_s = time.perf_counter() - t0

    # -----------------------------------------------------------------------------------------

    def _stage_inputs(self, n_cams: int, l_max: int, horizon: int, dims) -> None:
        """The engine's device inputs, one byte buffer filled by one copy from a job's slot:

        ints (int64):   [tokens (l_max) | gather (n_img + l_max) | n_valid (1)] -> buf.tokens, buf.gather, buf.n_valid
        floats (fp32):  [state (action_dim) | noise (horizon * action_dim)]     -> buf.state, buf.noise
        """
        n_img = n_cams * dims.vision.tokens
        n_int = l_max + n_img + l_max + 1
        a = dims.action_dim
        n_float = a + horizon * a
        self._slots = [Slot(n_int, n_float, tuple(self.buf.actions.shape), n_cams, self.device) for _ in range(2)]
        self._inputs_dev = torch.zeros(self._slots[0].head, dtype=torch.uint8, device=self.device)
        ints, floats = split_inputs(self._inputs_dev, n_int, n_float)
        b = self.buf
        b.tokens = ints[:l_max]
        b.gather = ints[l_max:l_max + n_img + l_max]
        b.n_valid = ints[-1:]
        b.state = floats[:a]
        b.noise = floats[a:].view(horizon, a)
        self._upload_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._next_slot = 0

    def reset(self) -> None:
        """Start of an episode: the noise generator restarts from its seed, so runs are repeatable (the
        noise of a job prepared before the reset was drawn then)."""
        self._noise = np.random.default_rng(self.config.random.seed)

    def infer(self, obs: dict, noise: np.ndarray | None = None) -> dict:
        """One action chunk: {"actions": float32 [action_horizon, action_dim]}."""
        job = self.prepare(obs, noise)
        with torch.inference_mode():
            job.launch_all()
        return job.result()

    def prepare(self, obs: dict, noise: np.ndarray | None = None) -> Job:
        """The host's share of an inference (validate, tokenize, stage); launch the job's segments next.

        At most two jobs of a policy may be prepared and not yet launched; launch them in the order
        they were prepared, and read a job's result before launching the job two after it."""
        if not isinstance(obs, dict):
            raise InputError(f"observation must be a mapping, got {type(obs).__name__}")
        spec = self.spec
        images = obs.get("images")
        if not isinstance(images, dict):
            raise InputError("observation.images must be a mapping of camera name -> uint8 [H, W, 3] image")
        unknown = sorted(set(images) - set(spec.cameras))
        if unknown:
            raise InputError(f"observation.images: unknown camera {unknown[0]!r} (cameras: {', '.join(spec.cameras)})")
        present = tuple(name in images for name in spec.cameras)
        for name, ok in zip(spec.cameras, present):
            if not ok and name not in spec.optional_cameras:
                raise InputError(f"observation.images: camera {name!r} is missing (it is not optional)")
        checked = [_image(images[n], n) if n in images else None for n in spec.cameras]
        state = _state(obs.get("state"), spec.state_dim)
        tokens = self._prompt_tokens(obs, state)
        shape = (spec.action_horizon, self.dims.action_dim)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != shape:
                raise InputError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
        else:  # drawn here, not on the device at launch: it travels with the inputs instead of adding a launch
            noise = self._noise.standard_normal(shape, dtype=np.float32)
        bucket = next(b for b in self.buckets if b >= len(tokens))

        slot = self._slots[self._next_slot]
        self._next_slot ^= 1
        slot.claim(checked)
        self._write_ints(slot, tokens, present)
        self._write_floats(slot, state, noise)
        # On a GPU the upload overlaps whatever the GPU runs now; the inputs segment waits for it.
        images = slot.stage(checked, self._upload_stream)
        inputs = Segment("inputs", lambda: self._take_inputs(slot, images))
        output = Segment("output", lambda: self._download(slot))
        return Job(bucket, [inputs, *self.engine.segments(bucket), output], slot)

    def _take_inputs(self, slot: Slot, images: list) -> None:
        """The inputs segment: the slot's ints and floats into the engine's static buffers (device to
        device on a GPU, after the slot's upload), the images preprocessed on the device."""
        slot.staged = False
        if slot.pin:
            torch.cuda.current_stream(self.device).wait_event(slot.uploaded)
        self._inputs_dev.copy_(slot.inputs())
        self.model.ops.images_to_model(images, self.buf.images)
        if slot.pin:
            slot.consumed.record()

    def _download(self, slot: Slot) -> None:
        slot.actions.copy_(self.buf.actions, non_blocking=slot.pin)
        if slot.downloaded is not None:
            slot.downloaded.record()

    def _prompt_tokens(self, obs: dict, state: np.ndarray) -> np.ndarray:
        if obs.get("prompt_tokens") is not None:
            ids = np.asarray(obs["prompt_tokens"])
            if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.size == 0:
                raise InputError(f"observation.prompt_tokens must be a non-empty 1-D int array, got "
                                 f"dtype {ids.dtype} shape {list(ids.shape)}")
            if ids.min() < 0 or ids.max() >= self.dims.vocab:
                raise InputError(f"observation.prompt_tokens: ids must be in [0, {self.dims.vocab})")
        else:
            text = obs.get("prompt", self.spec.default_prompt)
            if not isinstance(text, str):
                raise InputError("observation.prompt must be a string (and the model has no default prompt)"
                                 if text is None else f"observation.prompt must be a string, got {type(text).__name__}")
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer (set `tokenizer:` in its config): send prompt_tokens")
            if self.discrete_state:
                ids = self.tokenizer.pi05_prompt(text, self.norm.state(state))
            else:
                ids = self.tokenizer.pi0_prompt(text)
            ids = np.asarray(ids, dtype=np.int64)
            if ids.max(initial=0) >= self.dims.vocab:
                raise InputError(f"the prompt tokenizes to ids beyond the model's vocabulary ({self.dims.vocab})")
        if len(ids) > self.spec.max_prompt_tokens:
            raise InputError(f"the prompt is {len(ids)} tokens; this model takes at most {self.spec.max_prompt_tokens}")
        return ids

    def _write_ints(self, slot: Slot, tokens: np.ndarray, present: tuple[bool, ...]) -> None:
        l_max, t = self.buckets[-1], self._tokens_per_image
        n_img = len(present) * t
        host = slot.ints.numpy()
        host[: len(tokens)] = tokens
        host[len(tokens):l_max] = 0
        # Prefix rows: present cameras' tokens, then the prompt, then everything masked (kept for shape).
        src = np.arange(n_img + l_max)
        cams = [src[i * t:(i + 1) * t] for i in range(len(present))]
        valid = [c for c, p in zip(cams, present) if p] + [src[n_img:n_img + len(tokens)]]
        masked = [c for c, p in zip(cams, present) if not p] + [src[n_img + len(tokens):]]
        host[l_max:l_max + n_img + l_max] = np.concatenate(valid + masked)
        host[-1] = sum(len(v) for v in valid)

    def _write_floats(self, slot: Slot, state: np.ndarray, noise: np.ndarray) -> None:
        a = self.dims.action_dim
        host = slot.floats.numpy()
        host[:a] = 0
        host[: len(state)] = state  # raw: Pi0 normalizes on the device
        host[a:] = noise.ravel()


def _fingerprint(folder: Path | None) -> list | None:
    """Size and mtime of a checkpoint's weight files: a changed file invalidates cached calibration."""
    if folder is None:
        return None
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(folder.glob("*.safetensors"))]


def _state(value, dim: int) -> np.ndarray:
    if value is None:
        raise InputError(f"observation.state is missing (expected {dim} numbers)")
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"observation.state must be {dim} numbers") from None
    arr = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    if arr.shape != (dim,):
        raise InputError(f"observation.state must have shape [{dim}], got {list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise InputError("observation.state holds NaN or infinite values")
    return arr


def _image(value, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InputError(f"observation.images[{name!r}] must be a uint8 array [H, W, 3], got {type(value).__name__}")
    if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3 or min(value.shape[:2]) < 1:
        raise InputError(f"observation.images[{name!r}] must be uint8 [H, W, 3], got {value.dtype} {list(value.shape)}")
    if max(value.shape[:2]) > 4096:
        raise InputError(f"observation.images[{name!r}] is {value.shape[1]}x{value.shape[0]}; at most 4096 pixels a side")
    return value
