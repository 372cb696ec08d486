"""Checkpoints: find them (local folder or Hugging Face Hub), read their tensors, check their layout.

A checkpoint is seen through a `TensorSource`: canonical key -> shape, and a `get(key)` that loads one
tensor onto the device. Two layouts are read: openpi's PyTorch export (keys as in `models/layout.py`)
and LeRobot's (the same keys under a `model.` prefix, `embed_tokens` often absent and tied to the
PaliGemma `lm_head`). `RandomSource` produces seeded random tensors in the same layout, so demos and
benchmarks run the exact load path of a real checkpoint.
"""

from __future__ import annotations

import abc
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .models import layout
from .models.layout import PiDims

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "assets/**", "tokenizer*"]


def resolve(checkpoint: str, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a Hub snapshot (cached or fetched)
    of the files matching `patterns` (default: what a checkpoint needs)."""
    path = Path(checkpoint).expanduser()
    if path.exists() or checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") != 1:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist (and it is not a Hub id "
                                  "of the form org/name)")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = f"Hugging Face Hub model {checkpoint!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(snapshot_download(checkpoint, revision=revision, allow_patterns=patterns or HUB_PATTERNS,
                                      local_files_only=offline))
    except GatedRepoError:
        raise CheckpointError(f"{where} is gated: accept its licence on huggingface.co and log in "
                              "(HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where} does not exist (or is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: no such revision") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants
        cache = constants.HF_HUB_CACHE
        if offline:
            raise CheckpointError(f"{where} is not in the local cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
                                  "downloading it: fill the cache first (huggingface-cli download) or unset "
                                  "HF_HUB_OFFLINE") from None
        raise CheckpointError(f"{where} is not in the local cache ({cache}) and the Hub cannot be reached "
                              "(no network?): fill the cache on a connected machine first") from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Tensor sources


class TensorSource(abc.ABC):
    """Canonical key -> shape (`shapes`), and one tensor at a time as float32 on a device (`get`)."""

    shapes: dict[str, tuple[int, ...]]

    @abc.abstractmethod
    def get(self, key: str, device: torch.device) -> torch.Tensor: ...


def canonical_key(key: str, kind: str) -> str | None:
    """Map a checkpoint key onto the canonical layout; None for keys deliberately not loaded."""
    key = key.removeprefix("model.")
    if kind == "pi05":
        # LeRobot's Pi0.5 loader renames the Pi0-era time MLP and drops a leftover state_proj.
        if key.startswith("action_time_mlp_"):
            key = key.replace("action_time_mlp_", "time_mlp_", 1)
        if key.startswith("state_proj."):
            return None
    if key in layout.UNUSED:
        return None
    return key


class SafetensorsSource(TensorSource):
    """A checkpoint folder's model.safetensors (or its shards), read one tensor at a time."""

    def __init__(self, folder: Path, kind: str):
        from safetensors import safe_open

        index = folder / WEIGHTS_INDEX
        if (folder / WEIGHTS).exists():
            files = [folder / WEIGHTS]
        elif index.exists():
            files = sorted({folder / f for f in read_json(index).get("weight_map", {}).values()})
        else:
            raise CheckpointError(f"{folder}: no {WEIGHTS} (or {WEIGHTS_INDEX}): not a PyTorch checkpoint "
                                  "folder (openpi JAX/Orbax checkpoints must be converted first)")
        self._where: dict[str, tuple[Path, str]] = {}
        self.shapes = {}
        self.skipped: list[str] = []
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for raw in f.keys():
                        key = canonical_key(raw, kind)
                        if key is None:
                            self.skipped.append(raw)
                            continue
                        self._where[key] = (file, raw)
                        self.shapes[key] = tuple(f.get_slice(raw).get_shape())
            except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
                raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
        # Tied embeddings: save_model keeps one of embed_tokens / lm_head; either serves.
        if layout.EMBED not in self.shapes and layout.LM_HEAD in self.shapes:
            self._where[layout.EMBED] = self._where[layout.LM_HEAD]
            self.shapes[layout.EMBED] = self.shapes[layout.LM_HEAD]
        if layout.LM_HEAD in self.shapes:
            del self.shapes[layout.LM_HEAD], self._where[layout.LM_HEAD]

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        from safetensors import safe_open

        file, raw = self._where[key]
        dev = str(device) if device.type == "cuda" else "cpu"
        with safe_open(str(file), framework="pt", device=dev) as f:
            return f.get_tensor(raw).to(device=device, dtype=torch.float32)


class RandomSource(TensorSource):
    """Seeded random weights in the canonical layout, scaled so activations stay O(1) at any depth."""

    def __init__(self, dims: PiDims, seed: int):
        self.shapes = layout.expected_shapes(dims)
        self.seed = seed

    def get(self, key: str, device: torch.device) -> torch.Tensor:
        shape = self.shapes[key]
        gen = torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return x.mul_(init_std(key, shape)).add_(init_mean(key))


def init_std(key: str, shape: tuple[int, ...]) -> float:
    if key.endswith("bias"):
        return 0.02
    if "layernorm" in key or "layer_norm" in key:
        return 0.1  # SigLIP LayerNorm weight ~ 1 + N(0, .1); Gemma RMSNorm stores w of (1 + w)
    if key == layout.EMBED:
        return 1.0 / math.sqrt(shape[1])  # times sqrt(width) at lookup -> unit scale
    if "position_embedding" in key:
        return 0.1
    if key.endswith(".dense.weight"):
        return 0.5 / math.sqrt(shape[1])  # adaRMS modulation: scale/shift/gate of order 0.5
    return 1.0 / math.sqrt(math.prod(shape[1:]))  # linears and the patch conv: fan-in scaling


def init_mean(key: str) -> float:
    return 1.0 if key.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")) else 0.0


def check_layout(source: TensorSource, dims: PiDims, where: str) -> None:
    """Every expected key present with its shape, nothing unexpected: else an error naming the key."""
    expected = layout.expected_shapes(dims)
    for key, shape in expected.items():
        if key not in source.shapes:
            hint = " (nor the tied paligemma lm_head)" if key == layout.EMBED else ""
            raise CheckpointError(f"{where}: missing tensor {key!r}{hint}, expected shape {list(shape)}")
        if tuple(source.shapes[key]) != shape:
            raise CheckpointError(f"{where}: tensor {key!r} has shape {list(source.shapes[key])}, "
                                  f"expected {list(shape)}")
    unexpected = sorted(set(source.shapes) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r} with shape "
                              f"{list(source.shapes[unexpected[0]])}{more}: not part of a {dims.kind} model")


@dataclass
class CheckpointInfo:
    """What a checkpoint's config.json says that the engine can use (None where it is silent)."""

    action_horizon: int | None = None
    max_prompt_tokens: int | None = None
    normalization_mapping: dict | None = None
    layout: str = "openpi"


def read_info(folder: Path) -> CheckpointInfo:
    cfg = read_json(folder / "config.json")
    if "type" in cfg or "chunk_size" in cfg:  # LeRobot PreTrainedConfig
        return CheckpointInfo(cfg.get("chunk_size"), cfg.get("tokenizer_max_length"),
                              cfg.get("normalization_mapping"), "lerobot")
    return CheckpointInfo(cfg.get("action_horizon"), cfg.get("max_token_len"), None, "openpi")
