"""Pi0 and Pi0.5: SigLIP + PaliGemma prefix, Gemma-300M action expert, flow matching.

One class serves both kinds (`dims.kind`). Inference is three kinds of segments over static buffers:

  vision   images -> SigLIP tokens (same for every prompt length)
  prefix   prompt embedding, the 18 Gemma-2B layers writing the KV cache, the suffix's positions and
           attention windows; Pi0 also runs its state token here (it never sees the actions, so its
           K/V are the same in every step)
  step k   one Euler step of the flow: x <- x + dt * v(x, t_k); the last step unnormalizes the chunk

Everything that depends only on the fixed schedule is computed once at load: Pi0.5's adaRMS
scale/shift/gate for every norm and step, Pi0's time MLP input, dt folded into the output projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gemma
from .gemma import KVWindow, Modulation
from .layout import E, EMBED, L, PiDims
from .siglip import Siglip

MIN_PERIOD, MAX_PERIOD = 4e-3, 4.0


def schedule(num_steps: int) -> list[float]:
    """Flow times t = 1, 1 - 1/n, ... (noise at t = 1, data at t = 0), as float32 like openpi/LeRobot."""
    dt = -1.0 / num_steps
    return [float(torch.tensor(1.0 + k * dt, dtype=torch.float32)) for k in range(num_steps)]


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sine-cosine embedding of flow times t [S] -> [S, dim] float32, computed in float64."""
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = MIN_PERIOD * (MAX_PERIOD / MIN_PERIOD) ** frac
    ang = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([ang.sin(), ang.cos()], dim=1).float()


@dataclass
class Buffers:
    """Static device buffers of one engine: inputs, the KV cache, the flow state, the output."""

    images: Tensor  # [C, 3, S, S] model dtype, in [-1, 1]
    tokens: Tensor  # [L_max] int64 prompt token ids (bucket b reads the first L_b)
    gather: Tensor  # [C*T + L_max] int64: prefix row i comes from source row gather[i]
    n_valid: Tensor  # [1] int64: valid prefix tokens P
    state: Tensor  # [action_dim] float32, raw robot state zero-padded (Pi0 only)
    noise: Tensor  # [H, action_dim] float32
    prefix_src: Tensor  # [C*T + L_max, width]: image tokens then text embeddings
    prefix_x: Tensor  # [C*T + L_max, width]: the prefix's residual stream (kept between its segments)
    k_cache: Tensor  # [depth, N_max, head_dim]
    v_cache: Tensor
    x_t: Tensor  # [H, action_dim] float32, the flow state
    actions: Tensor  # [H, robot action dim] float32, unnormalized output
    # written by the prefix segment for the steps (Pi0: also for the state token)
    slots: Tensor  # [H] int64 cache rows (= positions) of the action tokens
    cos: Tensor  # [H, head_dim]
    sin: Tensor
    windows: dict  # name -> KVWindow (prefix buckets, "state", "steps" buckets)


class PiModel:
    def __init__(self, dims: PiDims, get: Callable[[str], Tensor], device: torch.device, dtype: torch.dtype,
                 ops, horizon: int, num_steps: int):
        self.dims, self.device, self.dtype, self.ops = dims, device, dtype, ops
        self.horizon, self.num_steps = horizon, num_steps
        self.pi05 = dims.kind == "pi05"

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype).contiguous()

        self.siglip = Siglip(dims.vision, get, cast)
        self.embed = cast(get(EMBED) * math.sqrt(dims.vlm.width))  # Gemma scales embeddings by sqrt(width)
        self.vlm = gemma.load_layers(dims.vlm, L, get, cast, fold_norms=True)
        self.expert = gemma.load_layers(dims.expert, E, get, cast, fold_norms=not self.pi05)
        self.cos_table, self.sin_table = gemma.rope_tables(4096, dims.vlm.head_dim, device, dtype)

        dt = -1.0 / num_steps
        t = torch.tensor(schedule(num_steps), device=device)
        temb = time_embedding(t, dims.expert.width)  # [steps, We]
        out_w, out_b = get("action_out_proj.weight"), get("action_out_proj.bias")
        if self.pi05:
            cond = F.silu(F.linear(F.silu(F.linear(temb, get("time_mlp_in.weight"), get("time_mlp_in.bias"))),
                                   get("time_mlp_out.weight"), get("time_mlp_out.bias")))
            norms = [f"{E}.layers.{n}.{which}.dense" for n in range(dims.expert.depth)
                     for which in ("input_layernorm", "post_attention_layernorm")] + [f"{E}.norm.dense"]
            w = torch.stack([get(f"{n}.weight") for n in norms])  # [J, 3We, We]
            b = torch.stack([get(f"{n}.bias") for n in norms])
            mod = torch.einsum("sc,joc->sjo", cond, w) + b  # [steps, J, 3We]
            scale, shift, gate = mod.chunk(3, dim=-1)
            self.mods = [Modulation(cast(1 + scale[k]), cast(shift[k]), cast(gate[k])) for k in range(num_steps)]
            self.in_w, self.in_b = cast(get("action_in_proj.weight")), cast(get("action_in_proj.bias"))
        else:
            self.mods = [None] * num_steps
            # action_time_mlp_in(cat(action_in_proj(x), temb)) = (Wa @ W_in) x + (Wa b_in + Wt temb + b):
            # the action projection folds into the MLP and the time half becomes a per-step bias.
            we = dims.expert.width
            mi_w, mi_b = get("action_time_mlp_in.weight"), get("action_time_mlp_in.bias")
            wa, wt = mi_w[:, :we], mi_w[:, we:]
            in_w, in_b = get("action_in_proj.weight"), get("action_in_proj.bias")
            self.in_w = cast(wa @ in_w)
            self.step_bias = [cast(wa @ in_b + wt @ temb[k] + mi_b) for k in range(num_steps)]
            self.mlp_out_w = cast(get("action_time_mlp_out.weight"))
            self.mlp_out_b = cast(get("action_time_mlp_out.bias"))
            self.state_w, self.state_b = cast(get("state_proj.weight")), cast(get("state_proj.bias"))
            out_w = out_w * (1 + get(f"{E}.norm.weight"))  # the expert's final RMSNorm weight
        # The Euler update x += dt * v: dt folds into the output projection.
        self.out_w, self.out_b = cast(out_w * dt), cast(out_b * dt)
        # (x - sub) * scale + add, rows [sub, scale, add]: set by the policy from its normalization
        # statistics (identity until then).
        identity = torch.tensor([[0.0], [1.0], [0.0]], device=device).repeat(1, dims.action_dim)
        self.state_norm, self.action_unnorm = identity.clone(), identity.clone()

    def linears(self) -> list[tuple[str, object, str, str | None]]:
        """The big projections a quantized precision replaces: (name, owner, weight attr, bias attr)."""
        out = [(f"vision.{n}.{lin}", L, f"{lin}_w", f"{lin}_b") for n, L in enumerate(self.siglip.layers)
               for lin in L.LINEARS]
        for stack, layers in (("vlm", self.vlm), ("expert", self.expert)):
            out += [(f"{stack}.{n}.{lin}", L, lin, None) for n, L in enumerate(layers) for lin in L.LINEARS]
        return out

    # -----------------------------------------------------------------------------------------
    # Buffers and attention windows

    @property
    def suffix_offset(self) -> int:
        """Cache rows between the prefix and the action tokens: Pi0's state token."""
        return 0 if self.pi05 else 1

    def buffers(self, n_cameras: int, buckets: list[int], action_dim: int, attention: str) -> Buffers:
        d, dev = self.dims, self.device
        n_img = n_cameras * d.vision.tokens
        l_max = buckets[-1]
        n_max = n_img + l_max + self.suffix_offset + self.horizon
        hd, depth = d.vlm.head_dim, d.vlm.depth
        if d.expert.head_dim != hd or d.expert.depth != depth:
            raise ValueError("the VLM and the action expert must share head_dim and depth")
        z = dict(device=dev, dtype=self.dtype)
        buf = Buffers(
            images=torch.zeros(n_cameras, 3, d.vision.image, d.vision.image, **z),
            tokens=torch.zeros(l_max, device=dev, dtype=torch.int64),
            gather=torch.arange(n_img + l_max, device=dev),
            n_valid=torch.full((1,), n_img, device=dev, dtype=torch.int64),
            state=torch.zeros(d.action_dim, device=dev),
            noise=torch.zeros(self.horizon, d.action_dim, device=dev),
            prefix_src=torch.zeros(n_img + l_max, d.vlm.width, **z),
            prefix_x=torch.zeros(n_img + l_max, d.vlm.width, **z),
            k_cache=torch.zeros(depth, n_max, hd, **z),
            v_cache=torch.zeros(depth, n_max, hd, **z),
            x_t=torch.zeros(self.horizon, d.action_dim, device=dev),
            actions=torch.zeros(self.horizon, action_dim, device=dev),
            slots=torch.zeros(self.horizon, device=dev, dtype=torch.int64),
            cos=torch.zeros(self.horizon, hd, **z), sin=torch.zeros(self.horizon, hd, **z),
            windows={})
        heads = d.vlm.heads

        def window(n_keys: int, q_rows: int) -> KVWindow:
            if attention == "flash_varlen":
                i32 = dict(device=dev, dtype=torch.int32)
                return KVWindow(n_keys, q_rows, torch.tensor([0, q_rows], **i32), torch.zeros(2, **i32))
            return KVWindow(n_keys, q_rows, key_mask=torch.zeros(n_keys, device=dev, dtype=torch.bool))

        for b in buckets:
            buf.windows[("prefix", b)] = window(n_img + b, (n_img + b) * heads)
            buf.windows[("steps", b)] = window(n_img + b + self.suffix_offset + self.horizon, self.horizon * heads)
            if not self.pi05:
                buf.windows[("state", b)] = window(n_img + b + 1, heads)
        return buf

    def _set_window(self, w: KVWindow, n_valid: Tensor, q_valid_rows: Tensor | None) -> None:
        if w.key_mask is None:
            w.cu_k[1:].copy_(n_valid)
            if q_valid_rows is not None:
                w.cu_q[1:].copy_(q_valid_rows)
        else:
            torch.lt(torch.arange(w.n_keys, device=self.device), n_valid, out=w.key_mask)

    # -----------------------------------------------------------------------------------------
    # Segments

    def vision(self, buf: Buffers) -> None:
        n_img = buf.images.shape[0] * self.dims.vision.tokens
        self.siglip.forward(self.ops, buf.images, buf.prefix_src[:n_img])

    def prefix_spans(self, parts: int) -> list[range]:
        """The prefix's layers cut into `parts` segments of (nearly) equal size."""
        depth = self.dims.vlm.depth
        parts = max(1, min(parts, depth))
        cuts = [round(depth * k / parts) for k in range(parts + 1)]
        return [range(a, b) for a, b in zip(cuts, cuts[1:])]

    def prefix(self, buf: Buffers, bucket: int, span: range | None = None) -> None:
        """The prefix (or the layers `span` of it: the first span also embeds, the last also sets up
        the suffix)."""
        d, ops = self.dims, self.ops
        span = span if span is not None else range(d.vlm.depth)
        n_img = buf.images.shape[0] * d.vision.tokens
        n = n_img + bucket
        x = buf.prefix_x[:n]
        p = buf.n_valid
        if span.start == 0:
            torch.index_select(self.embed, 0, buf.tokens[:bucket], out=buf.prefix_src[n_img:n])
            torch.index_select(buf.prefix_src, 0, buf.gather[:n], out=x)  # valid tokens first, then padding
            self._set_window(buf.windows[("prefix", bucket)], p, p * d.vlm.heads)
        gemma.run_layers(ops, d.vlm, self.vlm, x, self.cos_table[:n], self.sin_table[:n], buf.k_cache,
                         buf.v_cache, None, buf.windows[("prefix", bucket)], kv_only=True, span=span)
        if span.stop < d.vlm.depth:
            return
        # Suffix placement: action tokens take the rows (and positions) right after the valid prefix.
        off = self.suffix_offset
        torch.add(torch.arange(off, off + self.horizon, device=self.device), p, out=buf.slots)
        torch.index_select(self.cos_table, 0, buf.slots, out=buf.cos)
        torch.index_select(self.sin_table, 0, buf.slots, out=buf.sin)
        self._set_window(buf.windows[("steps", bucket)], p + off + self.horizon, None)
        if not self.pi05:
            self._state_token(buf, bucket, p)
        buf.x_t.copy_(buf.noise)

    def _state_token(self, buf: Buffers, bucket: int, p: Tensor) -> None:
        """Pi0's state token: position P, attends the prefix and itself; only its K/V are kept."""
        sub, scale, add = self.state_norm
        state = torch.addcmul(add, buf.state - sub, scale).to(self.dtype)
        x = F.linear(state[None], self.state_w, self.state_b)
        w = buf.windows[("state", bucket)]
        self._set_window(w, p + 1, None)
        gemma.run_layers(self.ops, self.dims.expert, self.expert, x, self.cos_table.index_select(0, p),
                         self.sin_table.index_select(0, p), buf.k_cache, buf.v_cache, p, w, kv_only=True)

    def step(self, buf: Buffers, bucket: int, k: int) -> None:
        x_t = buf.x_t.to(self.dtype)
        if self.pi05:
            x = F.linear(x_t, self.in_w, self.in_b)
        else:
            x = F.linear(F.silu(F.linear(x_t, self.in_w, self.step_bias[k])), self.mlp_out_w, self.mlp_out_b)
        h = gemma.run_layers(self.ops, self.dims.expert, self.expert, x, buf.cos, buf.sin, buf.k_cache,
                             buf.v_cache, buf.slots, buf.windows[("steps", bucket)], mod=self.mods[k],
                             prefetch=True)
        self.ops.linear_accumulate(buf.x_t, h, self.out_w, self.out_b)
        if k == self.num_steps - 1:
            n = buf.actions.shape[1]
            sub, scale, add = self.action_unnorm[:, :n]
            torch.addcmul(add, buf.x_t[:, :n] - sub, scale, out=buf.actions)
