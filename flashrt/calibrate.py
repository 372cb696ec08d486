"""Quantizing a loaded policy: calibrate (or read the cache), quantize in place, check the accuracy.

1. The bf16 engine runs the calibration observations eagerly, each big linear recording the largest
   activation it sees (FP8 needs these static scales; INT8 scales per token at run time). The first
   observation's action chunk, with fixed noise, is kept as the reference.
2. Every big linear of SigLIP, the Gemma prefix and the action expert is quantized in place, except
   those named by `calibration.keep_bf16` (unset: the precision's default, `quant.KEEP_BF16`).
3. After capture, the same observation and noise run through the quantized engine: the policy
   refuses to serve if the chunk's cosine to the bf16 reference is below `calibration.min_cosine`.

Scales are cached on disk (quant.cache_dir()) under a key of the checkpoint, the model settings and
the platform; `calibration.refresh: true` recomputes them. Calibration observations come from
`calibration.observations` (a folder of .npz files: `image.<camera>` uint8 HxWx3, `state`, and
`prompt` or `prompt_tokens`) or, without one, are synthetic (random images, the default prompt).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch

from . import quant
from .errors import AccuracyError, ConfigError


def observations(policy, count: int, folder: str | None) -> list[dict]:
    spec = policy.spec
    if folder is not None:
        files = sorted(Path(folder).expanduser().glob("*.npz"))
        if not files:
            raise ConfigError(f"calibration.observations: no .npz files in {folder}")
        out = []
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                obs = {"images": {k[len("image."):]: z[k] for k in z.files if k.startswith("image.")},
                       "state": z["state"]}
                if "prompt_tokens" in z.files:
                    obs["prompt_tokens"] = z["prompt_tokens"]
                elif "prompt" in z.files:
                    obs["prompt"] = str(z["prompt"])
            out.append(obs)
        return out
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(count):
        obs = {"images": {c: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for c in spec.cameras},
               "state": rng.normal(size=spec.state_dim).astype(np.float32)}
        if spec.default_prompt is None or policy.tokenizer is None:
            obs["prompt_tokens"] = np.concatenate([[2], rng.integers(3, min(policy.dims.vocab, 30000), 24)])
        out.append(obs)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def prepare(policy, precision: str, key_parts: dict) -> dict:
    """Steps 1 and 2 (before capture). Returns what the accuracy check and the spec need."""
    cfg = policy.config.calibration
    obs = observations(policy, cfg.count, cfg.observations)
    noise = np.random.default_rng(0).normal(size=(policy.spec.action_horizon, policy.dims.action_dim)).astype(np.float32)
    keep = list(quant.KEEP_BF16[precision] if cfg.keep_bf16 is None else cfg.keep_bf16)
    key = quant.cache_key(precision=precision, keep_bf16=keep, **key_parts)
    cached = None if cfg.refresh else quant.load_cached(key)
    linears = [lin for lin in policy.model.linears() if not any(fnmatchcase(lin[0], p) for p in keep)]
    if not linears:
        raise ConfigError(f"calibration.keep_bf16 {keep} keeps every projection in bf16: nothing is left to "
                          f"quantize to {precision}")
    amax: dict[str, float] = {}
    if precision == "fp8" and cached is None:
        # The prefix runs on a bucket's rows, valid tokens first: only those are recorded.
        recorders = {name: quant.Recorder(getattr(o, w), torch.zeros(1, device=policy.device),
                                          policy.buf.n_valid if name.startswith("vlm.") else None)
                     for name, o, w, _ in linears}
        for name, o, w, _ in linears:
            setattr(o, w, recorders[name])
        try:
            for i, ob in enumerate(obs):
                out = policy.infer(ob, noise=noise if i == 0 else None)["actions"]
                if i == 0:
                    reference = out
        finally:
            for name, o, w, _ in linears:
                setattr(o, w, recorders[name].weight)
        amax = {name: float(r.amax) for name, r in recorders.items()}
    else:
        reference = policy.infer(obs[0], noise=noise)["actions"]
        if cached is not None:
            amax = cached["amax"]
    if precision == "fp8" and set(amax) != {n for n, *_ in linears}:
        raise AccuracyError(f"calibration cache {quant.cache_dir() / key}.json does not match this model: "
                            "set calibration.refresh: true")
    path = quant.store(key, {"precision": precision, "amax": amax, "key": key_parts}) if cached is None else None
    for name, o, w, b in linears:
        qw = quant.QuantWeight.make(getattr(o, w), getattr(o, b) if b else None, precision, amax.get(name),
                                    per_channel=cfg.fp8_weight_scales == "channel")
        setattr(o, w, qw)
        if b:
            setattr(o, b, None)
    if policy.device.type == "cuda":
        torch.cuda.empty_cache()  # the bf16 weights just replaced go back to the driver
    return {"key": key, "kept_bf16": keep, "cache": str(quant.cache_dir() / f"{key}.json"), "cached": cached is not None,
            "stored": str(path) if path else None, "observations": len(obs), "reference": reference,
            "probe": (obs[0], noise)}


def check(policy, precision: str, info: dict) -> dict:
    """Step 3: the quantized engine against the bf16 reference; raises AccuracyError below the bar."""
    ob, noise = info.pop("probe")
    ref = info.pop("reference")
    out = policy.infer(ob, noise=noise)["actions"]
    cos = cosine(out, ref)
    rel = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    info.update(cosine=cos, max_rel_err=rel)
    bar = policy.config.calibration.min_cosine
    if not np.isfinite(out).all() or cos < bar:
        raise AccuracyError(f"{policy.config.name}: {precision} action chunk against bf16 on a calibration observation: "
                            f"cosine {cos:.6f} < calibration.min_cosine {bar} (max relative error {rel:.3g}); "
                            "refusing to serve. Use precision: bf16, another calibration set, or a lower bar.")
    return info
