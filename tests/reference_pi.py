"""An independent, plainly written fp32 Pi0 / Pi0.5, for checking the engine.

It follows openpi / LeRobot literally and shares no code with flashrt's models: it reads the raw
checkpoint keys, runs SigLIP per camera, keeps masked cameras and prompt padding in the sequence and
masks them (big_vision's make_attn_mask, positions = cumsum(pad) - 1), and at every denoising step
runs the *joint* forward of both Gemma stacks over [prefix | suffix] under the 2-D mask, with no KV
cache, no folded weights and no dropped tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model"
L = "paligemma_with_expert.paligemma.model.language_model"
E = "paligemma_with_expert.gemma_expert.model"
MASK_VALUE = -2.3819763e38


def linear(sd, name, x, bias=True):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias") if bias else None)


def siglip(sd, img, heads):
    """img [1, 3, S, S] in [-1, 1] -> [1, tokens, vlm width]."""
    x = F.conv2d(img, sd[f"{V}.embeddings.patch_embedding.weight"], sd[f"{V}.embeddings.patch_embedding.bias"],
                 stride=sd[f"{V}.embeddings.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2) + sd[f"{V}.embeddings.position_embedding.weight"][None]
    w = x.shape[-1]
    hd = w // heads
    n = 0
    while f"{V}.encoder.layers.{n}.layer_norm1.weight" in sd:
        p = f"{V}.encoder.layers.{n}"
        h = F.layer_norm(x, (w,), sd[f"{p}.layer_norm1.weight"], sd[f"{p}.layer_norm1.bias"], 1e-6)
        q, k, v = (linear(sd, f"{p}.self_attn.{t}_proj", h).view(1, -1, heads, hd).transpose(1, 2) for t in "qkv")
        att = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1) @ v
        x = x + linear(sd, f"{p}.self_attn.out_proj", att.transpose(1, 2).reshape(1, -1, w))
        h = F.layer_norm(x, (w,), sd[f"{p}.layer_norm2.weight"], sd[f"{p}.layer_norm2.bias"], 1e-6)
        x = x + linear(sd, f"{p}.mlp.fc2", F.gelu(linear(sd, f"{p}.mlp.fc1", h), approximate="tanh"))
        n += 1
    x = F.layer_norm(x, (w,), sd[f"{V}.post_layernorm.weight"], sd[f"{V}.post_layernorm.bias"], 1e-6)
    return linear(sd, "paligemma_with_expert.paligemma.model.multi_modal_projector.linear", x)


def rms(x, w=None, cond_dense=None, cond=None):
    """Gemma RMSNorm (1 + w), or adaRMSNorm from `cond`; returns (y, gate)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    if cond_dense is None:
        return y * (1 + w), None
    scale, shift, gate = F.linear(cond, *cond_dense).chunk(3, dim=-1)
    return y * (1 + scale) + shift, gate


def rope(x, pos, theta=10_000.0):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def joint_forward(sd, prefix, suffix, mask2d, pos, cond, heads):
    """Both stacks over [prefix | suffix] under one mask; returns the suffix output (final-normed)."""
    streams = [(L, prefix, None), (E, suffix, cond)]
    xs = [prefix, suffix]
    n = 0
    while f"{L}.layers.{n}.self_attn.q_proj.weight" in sd:
        qs, ks, vs, gates = [], [], [], []
        for (pre, _, c), x in zip(streams, xs):
            p = f"{pre}.layers.{n}"
            if c is None:
                h, g = rms(x, sd[f"{p}.input_layernorm.weight"])
            else:
                h, g = rms(x, cond_dense=(sd[f"{p}.input_layernorm.dense.weight"], sd[f"{p}.input_layernorm.dense.bias"]), cond=c)
            gates.append(g)
            hd = sd[f"{p}.self_attn.k_proj.weight"].shape[0]
            qs.append(linear(sd, f"{p}.self_attn.q_proj", h, bias=False).view(-1, heads, hd))
            ks.append(linear(sd, f"{p}.self_attn.k_proj", h, bias=False).view(-1, 1, hd))
            vs.append(linear(sd, f"{p}.self_attn.v_proj", h, bias=False).view(-1, 1, hd))
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        q, k = rope(q.transpose(0, 1), pos), rope(k.transpose(0, 1), pos)  # [heads, N, hd]
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        logits = torch.where(mask2d[None], logits, torch.tensor(MASK_VALUE))
        att = (torch.softmax(logits, dim=-1) @ v.transpose(0, 1)).transpose(0, 1).reshape(q.shape[1], -1)
        out, start = [], 0
        for (pre, _, c), x, g in zip(streams, xs, gates):
            p = f"{pre}.layers.{n}"
            a = linear(sd, f"{p}.self_attn.o_proj", att[start:start + x.shape[0]], bias=False)
            start += x.shape[0]
            x = x + (a if g is None else a * g)
            if c is None:
                h, g2 = rms(x, sd[f"{p}.post_attention_layernorm.weight"])
            else:
                h, g2 = rms(x, cond_dense=(sd[f"{p}.post_attention_layernorm.dense.weight"],
                                           sd[f"{p}.post_attention_layernorm.dense.bias"]), cond=c)
            m = linear(sd, f"{p}.mlp.down_proj", F.gelu(linear(sd, f"{p}.mlp.gate_proj", h, bias=False), approximate="tanh")
                       * linear(sd, f"{p}.mlp.up_proj", h, bias=False), bias=False)
            out.append(x + (m if g2 is None else m * g2))
        xs = out
        n += 1
    if cond is None:
        return rms(xs[1], sd[f"{E}.norm.weight"])[0]
    return rms(xs[1], cond_dense=(sd[f"{E}.norm.dense.weight"], sd[f"{E}.norm.dense.bias"]), cond=cond)[0]


def time_embedding(t: float, dim: int):
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** frac
    x = (1.0 / period * 2 * math.pi) * torch.tensor(t, dtype=torch.float32).double()
    return torch.cat([torch.sin(x), torch.cos(x)])[None].float()


def make_mask(pad, ar):
    c = torch.cumsum(ar, 0)
    return (c[None, :] <= c[:, None]) & pad[None, :] & pad[:, None]


def sample_actions(sd, kind, images, img_masks, tokens, token_mask, state, noise, num_steps, vision_heads, heads):
    """images: list of [1, 3, S, S]; tokens [Lmax] with token_mask; state [32] normalized (Pi0);
    noise [H, 32]. Returns the normalized action chunk [H, 32]."""
    sd = {k: v.double().float() for k, v in sd.items()}
    if f"{L}.embed_tokens.weight" not in sd:
        sd[f"{L}.embed_tokens.weight"] = sd["paligemma_with_expert.paligemma.lm_head.weight"]
    embs, pads = [], []
    for img, m in zip(images, img_masks):
        e = siglip(sd, img, vision_heads)[0]
        embs.append(e)
        pads.append(torch.full((e.shape[0],), bool(m)))
    width = sd[f"{L}.embed_tokens.weight"].shape[1]
    embs.append(sd[f"{L}.embed_tokens.weight"][tokens] * math.sqrt(width))
    pads.append(token_mask)
    prefix, prefix_pad = torch.cat(embs), torch.cat(pads)
    horizon = noise.shape[0]
    x_t, dt = noise.clone(), -1.0 / num_steps
    for step in range(num_steps):
        t = 1.0 + step * dt
        temb = time_embedding(t, sd["action_in_proj.weight"].shape[0])
        a = linear(sd, "action_in_proj", x_t)
        if kind == "pi05":
            cond = F.silu(linear(sd, "time_mlp_out", F.silu(linear(sd, "time_mlp_in", temb))))
            suffix, ar_suffix = a, [1] + [0] * (horizon - 1)
        else:
            cond = None
            at = torch.cat([a, temb.expand(horizon, -1)], dim=1)
            at = linear(sd, "action_time_mlp_out", F.silu(linear(sd, "action_time_mlp_in", at)))
            suffix = torch.cat([linear(sd, "state_proj", state[None]), at])
            ar_suffix = [1, 1] + [0] * (horizon - 1)
        pad = torch.cat([prefix_pad, torch.ones(suffix.shape[0], dtype=torch.bool)])
        ar = torch.tensor([0] * prefix.shape[0] + ar_suffix)
        pos = torch.cumsum(pad.long(), 0) - 1
        out = joint_forward(sd, prefix, suffix, make_mask(pad, ar), pos, cond, heads)
        v = linear(sd, "action_out_proj", out[-horizon:])
        x_t = x_t + dt * v
    return x_t
