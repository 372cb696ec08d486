"""Numerical parity with LeRobot at full size, on the GPU.

For Pi0.5 and Pi0: build LeRobot's own model (fp32), fill its parameters with seeded random values
(its default init leaves the adaRMS modulation at zero, which would hide the expert), save its
state_dict in LeRobot's checkpoint layout (`model.` prefix, tied embedding stored once), load that
folder with flashrt in fp32 and in bf16, and run both on the same images, prompt tokens, state and
noise. Targets: fp32 cosine >= 0.9999 and max relative error <= 1e-3 against LeRobot; our bf16
against our fp32 cosine >= 0.999.

    PYTHONPATH=peer_site python benchmarks/lerobot_parity.py   # writes results/lerobot_parity_<gpu>.json
"""

from __future__ import annotations

import gc
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import lerobot_inputs, lerobot_model, machine, save  # noqa: E402

import flashrt  # noqa: E402
from flashrt.checkpoint import init_mean, init_std  # noqa: E402

H = 50


def randomize(model, seed: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator(device=p.device).manual_seed(seed * 7919 + zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) * init_std(name, tuple(p.shape)) + init_mean(name))


def write_lerobot_checkpoint(model, folder: Path, kind: str, max_len: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    emb = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    head = "paligemma_with_expert.paligemma.lm_head.weight"
    if emb in sd and head in sd and sd[emb].data_ptr() == sd[head].data_ptr():
        del sd[emb]  # tied: LeRobot checkpoints keep only the lm_head
    save_file({f"model.{k}": v.detach().contiguous().cpu() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"type": kind, "chunk_size": H, "tokenizer_max_length": max_len}))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return {"cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
            "max_rel_err": float(np.abs(a - b).max() / np.abs(b).max()),
            "max_abs_err": float(np.abs(a - b).max()), "ref_absmax": float(np.abs(b).max())}


def case(kind: str, root: Path) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    max_len = 200 if kind == "pi05" else 48
    n_tok = 60 if kind == "pi05" else 40
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    tokens = np.concatenate([[2], rng.integers(3, 257000, n_tok - 1)]).astype(np.int64)
    state = rng.normal(size=32).astype(np.float32)
    noise = rng.normal(size=(H, 32)).astype(np.float32)
    out: dict = {"prompt_tokens": n_tok, "cameras": 3}

    t = time.time()
    model, _ = lerobot_model(kind, "float32")
    randomize(model, seed=5)
    with torch.inference_mode():
        ref = model.sample_actions(**lerobot_inputs(kind, images, tokens, max_len, state),
                                   noise=torch.from_numpy(noise).cuda()[None])[0].float().cpu().numpy()
    folder = root / f"lerobot_{kind}"
    write_lerobot_checkpoint(model, folder, kind, max_len)
    out["lerobot_build_run_save_s"] = time.time() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()

    cams = ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    obs = {"images": dict(zip(cams, images)), "state": state, "prompt_tokens": tokens}
    chunks = {}
    for precision in ("fp32", "bf16"):
        t = time.time()
        policy = flashrt.load(dict(name=f"{kind}_{precision}", kind=kind, checkpoint=str(folder), cameras=cams,
                                   state_dim=32, action_dim=32, precision=precision))
        chunks[precision] = policy.infer(obs, noise=noise)["actions"]
        out[f"flashrt_{precision}_load_s"] = time.time() - t
        del policy
        gc.collect()
        torch.cuda.empty_cache()
    out["fp32_vs_lerobot_fp32"] = compare(chunks["fp32"], ref)
    out["bf16_vs_fp32"] = compare(chunks["bf16"], chunks["fp32"])
    out["bf16_vs_lerobot_fp32"] = compare(chunks["bf16"], ref)
    out["pass"] = bool(out["fp32_vs_lerobot_fp32"]["cosine"] >= 0.9999
                       and out["fp32_vs_lerobot_fp32"]["max_rel_err"] <= 1e-3
                       and out["bf16_vs_fp32"]["cosine"] >= 0.999)
    return out


def main() -> None:
    # fp32 means fp32: no TF32 in LeRobot's matmuls or its patch convolution.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/flashrt_parity")
    res = {"machine": machine(), "cases": {}}
    for kind in ("pi05", "pi0"):
        try:
            res["cases"][kind] = case(kind, root)
        except Exception:  # keep the other case's figures
            import traceback
            res["cases"][kind] = {"error": traceback.format_exc()[-3000:]}
        print(kind, json.dumps(res["cases"][kind], indent=1), flush=True)
        save("lerobot_parity", res)


if __name__ == "__main__":
    main()
