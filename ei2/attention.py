"""Attention for EI²: SD's attention (Eq. 3), the frame attentions (SA, Tune-A-Video's SCA, FFAM Eq. 10, full),
Instance Centering (Eq. 6), spectral normalization (Eq. 8) and the temporal modules (STAM Eq. 9, Tune-A-Video's TA and
the Fig. 4 ablation variants).

Shapes: b batch, n frames, l = h * w tokens per frame, d channels, H heads. Inside the UNet a video is kept as a batch
of frames, (b * n, l, d), so every 2D layer of Stable Diffusion applies unchanged; the modules here reshape to reach
other frames.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .norms import LOW, LayerNorm

FRAME_ATTENTIONS = ("self", "sca", "ffam", "full")
TEMPORAL_NORMS = ("layernorm", "layernorm_noaffine", "none", "instancenorm", "ic")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. 3, Attention = softmax(Q K^T / sqrt(d)) V, per head. q (B, Lq, d), k and v (B, Lk, d) -> (B, Lq, d)."""
    B, Lq, d = q.shape
    # (B, L, d) -> (B, H, L, d/H): SDPA picks a flash / memory-efficient kernel where it can
    q, k, v = (t.unflatten(-1, (heads, d // heads)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, Lq, d)


class Attention(nn.Module):
    """SD's attention block: Q = z W_q, K = c W_k, V = c W_v (no biases), then the output Linear `to_out.0`.

    Used as self-attention (attn1, c = z) and cross-attention (attn2, c = the text embedding)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # ".0" as in the checkpoint (diffusers keeps a Dropout at .1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


# --- Frame attention: which tokens a frame's queries see (attn1 of every transformer block) ------------------------


def fine_coarse_context(z: torch.Tensor, r: int) -> torch.Tensor:
    """Eq. 10, z_FC = concat[z^i, downsample(z^j, r) for j != i], for every frame i at once.

    z (b, n, h, w, d) -> (b, n, L, d) with L = h*w + (n-1) * ceil(h/r) * ceil(w/r): row i holds frame i's own h*w tokens
    (fine) followed by the strided [::r, ::r] tokens (coarse) of the other frames in increasing j."""
    b, n, h, w, d = z.shape
    fine = z.reshape(b, n, h * w, d)
    coarse = z[:, :, ::r, ::r].reshape(b, n, -1, d)  # (b, n, lc, d), lc = ceil(h/r) * ceil(w/r)
    if n == 1:
        return fine
    # others[i] = [j for j in range(n) if j != i], an (n, n-1) index into the frame axis: others[i, k] = k + (k >= i).
    # Arithmetic, not a boolean mask, so nothing waits for the device (a mask index is a nonzero(), a host sync).
    k = torch.arange(n - 1, device=z.device)
    others = k + (k >= torch.arange(n, device=z.device)[:, None])
    coarse = coarse[:, others].reshape(b, n, (n - 1) * coarse.shape[2], d)  # (b, n, n-1, lc, d) -> (b, n, (n-1) lc, d)
    return torch.cat([fine, coarse], dim=2)


def sparse_causal_context(z: torch.Tensor) -> torch.Tensor:
    """Tune-A-Video's SCA keys: frame i sees [frame 0 ; frame i-1] (frame 0 sees itself twice). z (b, n, l, d) ->
    (b, n, 2 l, d)."""
    n = z.shape[1]
    previous = (torch.arange(n, device=z.device) - 1).clamp(min=0)
    return torch.cat([z[:, [0] * n], z[:, previous]], dim=2)


class FrameAttention(Attention):
    """attn1 of the inflated UNet, with SD's pretrained weights; `mode` picks the keys of frame i:
    - "self": frame i only (image SD, Eq. 3);
    - "sca":  frame 0 and frame i-1 (Tune-A-Video);
    - "ffam": frame i at full resolution plus frames j != i strided by r (EI², Eq. 10);
    - "full": every frame at full resolution (= FFAM with r = 1, computed as one joint attention)."""

    def __init__(self, dim: int, heads: int, mode: str = "ffam", ratio: int = 2):
        super().__init__(dim, heads)
        self.mode, self.ratio = mode, ratio

    def forward(self, x: torch.Tensor, n: int = 1, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """x (b*n, l, d), frames of one video consecutive; hw = (h, w) with h*w = l."""
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # projecting before gathering is the same, and cheaper
        if n > 1 and self.mode != "self":
            bn, l, d = x.shape
            b = bn // n
            if self.mode == "full":
                # one attention over all n*l tokens of a video: (b*n, l, d) -> (b, n*l, d); the softmax over keys does
                # not depend on their order, so this equals FFAM with r = 1
                q, k, v = (t.reshape(b, n * l, d) for t in (q, k, v))
                return self.to_out[0](attention(q, k, v, self.heads)).reshape(bn, l, d)
            if self.mode == "sca":
                k, v = (sparse_causal_context(t.view(b, n, l, d)).flatten(0, 1) for t in (k, v))
            else:  # ffam
                h, w = hw
                k, v = (fine_coarse_context(t.view(b, n, h, w, d), self.ratio).flatten(0, 1) for t in (k, v))
        return self.to_out[0](attention(q, k, v, self.heads))


# --- Temporal modules: attention across the n frames at each spatial location ------------------------------------


def instance_centering(z: torch.Tensor) -> torch.Tensor:
    """Eq. 6, IC(z) = z - (1/n) sum_i z^i, for z (..., n, d): centers over the n axis, no rescaling.

    A bf16 / fp16 z (the residual stream under autocast) is centered in fp32 and the result rounded once to z's dtype.
    In the low dtype the mean would be rounded at the scale of the stream's magnitude, which is large next to the
    frames' deviations from it; that rounding error is the same for every frame, so IC would leave a temporal mean
    behind (mu_rv(IC(z)) != 0, what Eq. 6 removes). docs/precision.md measures it."""
    if z.dtype in LOW:
        z32 = z.float()
        return (z32 - z32.mean(dim=-2, keepdim=True)).to(z.dtype)
    return z - z.mean(dim=-2, keepdim=True)


class InstanceCentering(nn.Module):
    """Eq. 6 as a module (no parameters), the normalization of STAM."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return instance_centering(z)


class InstanceNorm(nn.Module):
    """Fig. 4 variant: normalize each channel over the n frames, (z - mean_n) / sqrt(var_n + eps); no affine."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z32 = z.float()  # fp32 centering for a bf16 / fp16 z, as `instance_centering`; the output in z's dtype
        var, mean = torch.var_mean(z32, dim=-2, keepdim=True, correction=0)
        return ((z32 - mean) * torch.rsqrt(var + self.eps)).to(z.dtype)


def temporal_norm(kind: str, dim: int) -> nn.Module:
    """The normalization in front of the temporal attention: Tune-A-Video's LayerNorm (and the Fig. 4 variants)."""
    if kind == "layernorm":
        return LayerNorm(dim)
    if kind == "layernorm_noaffine":
        return LayerNorm(dim, elementwise_affine=False)
    if kind == "instancenorm":
        return InstanceNorm()
    if kind == "ic":
        return InstanceCentering()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown temporal norm {kind!r}; choose from {', '.join(TEMPORAL_NORMS)}")


class SpectralNormLinear(nn.Linear):
    """Linear(x) = x W̄^T + b with W̄ = W / sigma_max(W) (Eq. 8; Miyato et al. 2018).

    sigma_max is estimated by power iteration on persistent vectors u (out) and v (in), kept as buffers so checkpoints
    carry them: one iteration per training forward, none in eval, and iterated to convergence when created (and by
    `converge()` after the weight is set by hand). sigma = u^T W v keeps the gradient through W, u and v are constants.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-12):
        super().__init__(in_features, out_features, bias=bias)
        self.eps = eps
        # The UNet turns this off and iterates all its spectral norms once at the start of each training forward, so
        # that gradient checkpointing's recomputation sees the same u, v as the first pass.
        self.iterate_in_forward = True
        g = torch.Generator().manual_seed(in_features * 7919 + out_features)  # deterministic start, any is fine
        u, v = (F.normalize(torch.randn(k, generator=g, device="cpu"), dim=0, eps=eps)
                for k in (out_features, in_features))
        self.register_buffer("u", u.to(self.weight.device))
        self.register_buffer("v", v.to(self.weight.device))
        self.converge()

    @torch.no_grad()
    def power_iteration(self, iterations: int = 1) -> None:
        W = self.weight.float()
        u, v = self.u.float(), self.v.float()
        for _ in range(iterations):
            v = F.normalize(W.t() @ u, dim=0, eps=self.eps)
            u = F.normalize(W @ v, dim=0, eps=self.eps)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def converge(self, max_iterations: int = 1000, tol: float = 1e-6) -> None:
        """Power-iterate until sigma changes by less than `tol` (relative) over 10 iterations, so W̄ is normalized from
        the first step. sigma's error shrinks like (sigma_2 / sigma_1)^(2k): about 100 iterations reach 1e-4 for the
        1280 x 1280 maps of SD's deepest level at their random init. A module built on the meta device (shapes only,
        no values) has nothing to converge."""
        if self.weight.is_meta:
            return
        sigma = self.sigma()
        for _ in range(max_iterations // 10):
            self.power_iteration(10)
            new = self.sigma()
            if abs(new - sigma) <= tol * abs(new):
                break
            sigma = new

    def sigma(self) -> torch.Tensor:
        """u^T W v in fp32 whatever the autocast context (a bf16 sigma would rescale W by up to 0.4 %)."""
        device = self.weight.device.type
        off = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
        with off:
            return torch.dot(self.u.float(), torch.mv(self.weight.float(), self.v.float()))

    def normalized_weight(self) -> torch.Tensor:
        if self.training and self.iterate_in_forward:
            self.power_iteration(1)
        return self.weight / self.sigma().to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class TemporalAttention(Attention):
    """The attention of a temporal module, over the n frames at each spatial location: Linear(Attention(ẑ, ẑ)) where
    ẑ = N(z) is computed by the block's `norm_temp` (see `ei2.unet.BasicTransformerBlock`, which adds the residual).

    - STAM (Eq. 8-9): N = IC; V = ẑ W̄_v and Linear(x) = x W̄_L + b with spectral norm; b starts at zero.
    - TA (Tune-A-Video): N = LayerNorm (affine frozen); plain W_v, W_L; W_L starts at zero, b keeps its default init.
    - Fig. 4 variants: any N of TEMPORAL_NORMS, with or without spectral norm.
    Q = ẑ W_q and K = ẑ W_k are plain, bias-free maps in every variant; no positional encoding. Names mirror
    Tune-A-Video's `attn_temp` so its checkpoints map by identity.
    """

    def __init__(self, dim: int, heads: int = 8, spectral_norm: bool = True, zero_out_weight: bool = False,
                 zero_out_bias: bool = True):
        super().__init__(dim, heads)
        self.spectral_norm = spectral_norm
        if spectral_norm:
            self.to_v = SpectralNormLinear(dim, dim, bias=False)  # W̄_v
            self.to_out = nn.ModuleList([SpectralNormLinear(dim, dim)])  # W̄_L, b
        out = self.to_out[0]
        with torch.no_grad():
            if zero_out_weight:  # Tune-A-Video starts TA's output map at zero (impossible with spectral norm)
                out.weight.zero_()
            if zero_out_bias:
                out.bias.zero_()


def temporal_module(kind: str, dim: int, heads: int = 8, norm: str | None = None,
                    spectral_norm: bool | None = None) -> tuple[nn.Module, TemporalAttention]:
    """(norm_temp, attn_temp) of a temporal module.

    kind "stam": IC + spectral norm, b = 0 (Eq. 9). kind "ta": Tune-A-Video's LayerNorm temporal attention.
    `norm` and `spectral_norm` override the kind's choice (Fig. 4 ablation); without spectral norm the output weight
    starts at zero (as TA), with it the output weight keeps its random init (W / sigma_max needs W != 0)."""
    if kind not in ("stam", "ta"):
        raise ValueError(f"unknown temporal module {kind!r}; choose stam, ta or none")
    norm = norm or ("ic" if kind == "stam" else "layernorm")
    sn = (kind == "stam") if spectral_norm is None else spectral_norm
    attn = TemporalAttention(dim, heads, spectral_norm=sn, zero_out_weight=not sn, zero_out_bias=(kind == "stam"))
    return temporal_norm(norm, dim), attn
