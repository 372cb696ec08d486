"""Model dimensions and the checkpoint key layout of Pi0 / Pi0.5.

One table, `expected_shapes(dims)`, lists every tensor a checkpoint must hold (in openpi's PyTorch
naming, which LeRobot uses with a `model.` prefix). The loader checks checkpoints against it and
random weights are generated from it, so a tiny test model and the full model go through the same
code. Dimensions are read off a checkpoint's shapes (`infer_dims`), never assumed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import CheckpointError


@dataclass(frozen=True)
class VisionDims:
    width: int
    depth: int
    mlp: int
    heads: int
    patch: int = 14
    image: int = 224

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2


@dataclass(frozen=True)
class GemmaDims:
    width: int
    depth: int
    mlp: int
    heads: int
    head_dim: int  # one KV head (Gemma 2B and 300M are multi-query)


@dataclass(frozen=True)
class PiDims:
    kind: str  # pi0 | pi05
    vision: VisionDims
    vlm: GemmaDims
    expert: GemmaDims
    vocab: int
    action_dim: int = 32  # padded state/action width inside the model


PRESETS = {
    "full": dict(
        vision=VisionDims(width=1152, depth=27, mlp=4304, heads=16),
        vlm=GemmaDims(width=2048, depth=18, mlp=16384, heads=8, head_dim=256),
        expert=GemmaDims(width=1024, depth=18, mlp=4096, heads=8, head_dim=256),
        vocab=257152,
    ),
    # Same structure, small widths: runs in milliseconds on a CPU; vocab covers the byte tokenizer.
    "tiny": dict(
        vision=VisionDims(width=32, depth=2, mlp=64, heads=2),
        vlm=GemmaDims(width=64, depth=2, mlp=128, heads=2, head_dim=16),
        expert=GemmaDims(width=32, depth=2, mlp=64, heads=2, head_dim=16),
        vocab=512,
    ),
}


def preset(kind: str, size: str) -> PiDims:
    return PiDims(kind=kind, **PRESETS[size])


V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
PROJ = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear"
L = "paligemma_with_expert.paligemma.model.language_model"
LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EMBED = f"{L}.embed_tokens.weight"
E = "paligemma_with_expert.gemma_expert.model"

# Present in real checkpoints but not read at inference: the VLM's final norm (the prefix output is
# never used, only its KV cache) and the expert's LM head.
UNUSED = (f"{L}.norm.weight", "paligemma_with_expert.gemma_expert.lm_head.weight")


def _linear(out: dict, name: str, o: int, i: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (o, i)
    if bias:
        out[f"{name}.bias"] = (o,)


def _gemma_layers(out: dict, prefix: str, g: GemmaDims, ada_cond: int | None) -> None:
    for n in range(g.depth):
        p = f"{prefix}.layers.{n}"
        _linear(out, f"{p}.self_attn.q_proj", g.heads * g.head_dim, g.width, bias=False)
        _linear(out, f"{p}.self_attn.k_proj", g.head_dim, g.width, bias=False)
        _linear(out, f"{p}.self_attn.v_proj", g.head_dim, g.width, bias=False)
        _linear(out, f"{p}.self_attn.o_proj", g.width, g.heads * g.head_dim, bias=False)
        _linear(out, f"{p}.mlp.gate_proj", g.mlp, g.width, bias=False)
        _linear(out, f"{p}.mlp.up_proj", g.mlp, g.width, bias=False)
        _linear(out, f"{p}.mlp.down_proj", g.width, g.mlp, bias=False)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if ada_cond:
                _linear(out, f"{p}.{norm}.dense", 3 * g.width, ada_cond)
            else:
                out[f"{p}.{norm}.weight"] = (g.width,)


def expected_shapes(d: PiDims) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine reads, by canonical key, with its shape ([out, in] for linears)."""
    out: dict[str, tuple[int, ...]] = {}
    v = d.vision
    out[f"{V}.embeddings.patch_embedding.weight"] = (v.width, 3, v.patch, v.patch)
    out[f"{V}.embeddings.patch_embedding.bias"] = (v.width,)
    out[f"{V}.embeddings.position_embedding.weight"] = (v.tokens, v.width)
    for n in range(v.depth):
        p = f"{V}.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(out, f"{p}.self_attn.{proj}", v.width, v.width)
        for ln in ("layer_norm1", "layer_norm2"):
            out[f"{p}.{ln}.weight"] = out[f"{p}.{ln}.bias"] = (v.width,)
        _linear(out, f"{p}.mlp.fc1", v.mlp, v.width)
        _linear(out, f"{p}.mlp.fc2", v.width, v.mlp)
    out[f"{V}.post_layernorm.weight"] = out[f"{V}.post_layernorm.bias"] = (v.width,)
    _linear(out, PROJ, d.vlm.width, v.width)
    out[EMBED] = (d.vocab, d.vlm.width)
    _gemma_layers(out, L, d.vlm, None)
    ew, a = d.expert.width, d.action_dim
    pi05 = d.kind == "pi05"
    _gemma_layers(out, E, d.expert, ew if pi05 else None)
    if pi05:
        _linear(out, f"{E}.norm.dense", 3 * ew, ew)
        _linear(out, "time_mlp_in", ew, ew)
        _linear(out, "time_mlp_out", ew, ew)
    else:
        out[f"{E}.norm.weight"] = (ew,)
        _linear(out, "state_proj", ew, a)
        _linear(out, "action_time_mlp_in", ew, 2 * ew)
        _linear(out, "action_time_mlp_out", ew, ew)
    _linear(out, "action_in_proj", ew, a)
    _linear(out, "action_out_proj", a, ew)
    return out


def _depth(shapes: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.layers\.(\d+)\.")
    idx = {int(m.group(1)) for k in shapes if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def _shape(shapes: dict, key: str) -> tuple[int, ...]:
    """The shape of `key`; for a per-layer key (`layers.0.`) that of the first layer that has it, so
    that a tensor missing from one layer is reported by check_layout with its expected shape."""
    if key in shapes:
        return tuple(shapes[key])
    if ".layers.0." in key:
        head, tail = key.split(".layers.0.")
        for k, shape in shapes.items():
            if k.startswith(head + ".layers.") and k.endswith("." + tail):
                return tuple(shape)
    raise CheckpointError(f"checkpoint has no tensor {key!r}: not a Pi0/Pi0.5 checkpoint in the "
                          "openpi or LeRobot layout")


def infer_dims(kind: str, shapes: dict[str, tuple[int, ...]]) -> PiDims:
    """Read the model's dimensions off a checkpoint's tensor shapes (canonical keys)."""
    # The expert's norms tell the kinds apart: adaRMS (a Dense per norm) in Pi0.5, plain weights in Pi0.
    has_pi05 = any(k.startswith(E) and k.endswith("layernorm.dense.weight") for k in shapes)
    has_pi0 = any(k.startswith(E) and k.endswith("layernorm.weight") for k in shapes)
    if kind == "pi05" and has_pi0 and not has_pi05:
        raise CheckpointError("the checkpoint is a Pi0 model (its action expert has plain RMSNorm weights) "
                              "but the config says kind: pi05")
    if kind == "pi0" and has_pi05:
        raise CheckpointError("the checkpoint is a Pi0.5 model (adaRMS expert norms / time_mlp) "
                              "but the config says kind: pi0")
    pw = _shape(shapes, f"{V}.embeddings.patch_embedding.weight")
    width, patch = pw[0], pw[2]
    n_pos = _shape(shapes, f"{V}.embeddings.position_embedding.weight")[0]
    side = math.isqrt(n_pos)
    # Head counts are not recorded in checkpoints: SigLIP So400m has 16 heads of 72; our tiny test
    # models use heads of 16.
    vision = VisionDims(width=width, depth=_depth(shapes, f"{V}.encoder"),
                        mlp=_shape(shapes, f"{V}.encoder.layers.0.mlp.fc1.weight")[0],
                        heads=16 if width == 1152 else max(1, width // 16), patch=patch, image=side * patch)

    def gemma(prefix: str) -> GemmaDims:
        q = _shape(shapes, f"{prefix}.layers.0.self_attn.q_proj.weight")
        hd = _shape(shapes, f"{prefix}.layers.0.self_attn.k_proj.weight")[0]
        return GemmaDims(width=q[1], depth=_depth(shapes, prefix), heads=q[0] // hd, head_dim=hd,
                         mlp=_shape(shapes, f"{prefix}.layers.0.mlp.gate_proj.weight")[0])

    if EMBED not in shapes:
        raise CheckpointError(f"missing tensor {EMBED!r} (nor the tied paligemma lm_head)")
    vocab_key = EMBED
    return PiDims(kind=kind, vision=vision, vlm=gemma(L), expert=gemma(E), vocab=_shape(shapes, vocab_key)[0],
                  action_dim=_shape(shapes, "action_in_proj.weight")[1])
