"""Tiny Pi0 / Pi0.5 checkpoints written to disk in LeRobot's and openpi's layouts, for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from flashrt.checkpoint import RandomSource
from flashrt.models import layout

STATE_STATS = {"mean": [0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0, 2.0], "std": [1.0, 2.0, 0.5, 1.5, 1.0, 0.7, 0.3, 1.1],
               "q01": [-1.0, -2.0, -0.5, -1.0, -1.5, -2.0, 0.0, 0.5], "q99": [1.0, 2.0, 1.5, 1.0, 2.5, 1.0, 2.0, 3.5]}
ACTION_STATS = {k: v[:7] for k, v in STATE_STATS.items()}


def random_state_dict(kind: str, seed: int = 0, size: str = "tiny") -> dict[str, torch.Tensor]:
    src = RandomSource(layout.preset(kind, size), seed)
    return {k: src.get(k, torch.device("cpu")) for k in src.shapes}


def write_checkpoint(folder: Path, kind: str, style: str, seed: int = 0, horizon: int = 10,
                     stats: bool = True, max_tokens: int = 48) -> dict[str, torch.Tensor]:
    """Write a tiny checkpoint; returns the canonical state dict it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(kind, seed)
    dims = layout.preset(kind, "tiny")
    unused = {layout.UNUSED[0]: torch.zeros(dims.vlm.width),
              layout.UNUSED[1]: torch.zeros(dims.vocab, dims.expert.width)}
    if style == "lerobot":
        # LeRobot: `model.` prefix, fp32, embed_tokens absent (tied to the PaliGemma lm_head).
        out = {("model." + (layout.LM_HEAD if k == layout.EMBED else k)): v for k, v in {**sd, **unused}.items()}
        cfg = {"type": kind, "chunk_size": horizon, "n_action_steps": horizon, "tokenizer_max_length": max_tokens,
               "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
               "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD" if kind == "pi0" else "QUANTILES",
                                         "ACTION": "MEAN_STD" if kind == "pi0" else "QUANTILES"}}
        if stats:
            save_numpy({f"observation.state.{k}": np.asarray(v, np.float32) for k, v in STATE_STATS.items()},
                       str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
            save_numpy({f"action.{k}": np.asarray(v, np.float32) for k, v in ACTION_STATS.items()},
                       str(folder / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    else:
        # openpi's PyTorch export: no prefix, bf16 or fp32, config.json with the model settings.
        out = {**sd, **unused}
        cfg = {"action_dim": 32, "action_horizon": horizon, "paligemma_variant": "gemma_2b",
               "action_expert_variant": "gemma_300m", "precision": "float32", "max_token_len": max_tokens}
        if stats:
            assets = folder / "assets" / "trossen"
            assets.mkdir(parents=True, exist_ok=True)
            (assets / "norm_stats.json").write_text(json.dumps(
                {"norm_stats": {"state": STATE_STATS, "actions": ACTION_STATS}}))
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return sd
