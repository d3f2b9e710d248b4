"""EI²'s modules against the paper's equations: IC (Eq. 6), spectral norm (Eq. 8), Proposition 1, STAM (Eq. 7, 9 and
the section 4.3 claim), FFAM (Eq. 10), the inflated UNet with one frame, and the trainable set (section 5)."""

import pytest
import torch
from conftest import diffusers_unet

from ei2.attention import (
    FrameAttention,
    SpectralNormLinear,
    attention,
    fine_coarse_context,
    instance_centering,
    sparse_causal_context,
    temporal_module,
)
from ei2.unet import UNet, UNetConfig, VideoOptions, is_trainable_key, mark_trainable


# --- Eq. 6: Instance Centering ---------------------------------------------------------------------------------------


def test_instance_centering_eq6():
    """IC(z) = z - (1/n) sum_i z^i: zero mean over the n frames, centered covariance kept exactly, idempotent."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 8, 16, generator=g, dtype=torch.float64) * 3 + 2  # (locations, n, d)
    ic = instance_centering(z)
    assert ic.mean(dim=1).abs().max() < 1e-12
    centered = z - z.mean(dim=1, keepdim=True)
    cov_in = centered.transpose(1, 2) @ centered / 8
    cov_out = ic.transpose(1, 2) @ ic / 8
    assert torch.allclose(cov_out, cov_in, atol=1e-12)
    assert torch.allclose(instance_centering(ic), ic, atol=1e-12)
    # hand case: frames [1, 2, 3] -> [-1, 0, 1]
    assert torch.equal(instance_centering(torch.tensor([[1.0], [2.0], [3.0]])), torch.tensor([[-1.0], [0.0], [1.0]]))


@pytest.mark.parametrize("kind", ["ic", "instancenorm"])
def test_instance_centering_in_bf16_autocast(kind):
    """Under bf16 autocast the residual stream is bf16 with a mean far larger than the frames' deviations from it
    (here 100 vs about 1, as SD's). Centered in bf16 the mean would be rounded at that scale (bf16's step at 100 is
    0.5), an error the same for every frame; IC centers in fp32 and rounds once, so its output is within bf16's own
    relative precision (2^-8) of the fp32 result on the same input, and has no temporal mean left."""
    from ei2.attention import temporal_norm

    g = torch.Generator().manual_seed(0)
    mean = 100 + 20 * torch.randn(64, generator=g)
    z = (mean + torch.randn(256, 8, 64, generator=g)).bfloat16()  # (locations, n, d)
    norm = temporal_norm(kind, 64)
    reference = norm(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(z)
    assert out.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (out.float() - reference).abs().max() <= 2**-8 * scale
    assert out.float().mean(dim=1).abs().max() <= 2**-8 * scale  # mu_rv(IC(z)) about 0 (Eq. 6)


# --- Eq. 8: spectral normalization by power iteration ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 96)])
def test_spectral_norm_converged_at_creation(shape):
    torch.manual_seed(0)
    layer = SpectralNormLinear(shape[1], shape[0])
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    layer.eval()
    w_bar = layer.normalized_weight().detach()
    assert abs(torch.linalg.matrix_norm(w_bar, ord=2).item() - 1.0) < 1e-3
    assert abs(layer.sigma().item() - sigma.item()) / sigma.item() < 1e-3


def test_spectral_norm_one_iteration_in_training_none_in_eval():
    torch.manual_seed(0)
    layer = SpectralNormLinear(32, 48)
    x = torch.randn(4, 32)
    with torch.no_grad():
        layer.u.copy_(torch.nn.functional.normalize(torch.randn(48), dim=0))  # knock u off the converged vector
    u0 = layer.u.clone()
    layer.eval()
    layer(x)
    assert torch.equal(layer.u, u0), "eval must not change u"
    layer.train()
    layer(x)
    W = layer.weight.detach()
    v1 = torch.nn.functional.normalize(W.t() @ u0, dim=0)
    assert torch.allclose(layer.u, torch.nn.functional.normalize(W @ v1, dim=0), atol=1e-6), "one iteration per forward"


def test_spectral_norm_gradient_flows_through_sigma():
    """W̄ = W / sigma(W): the gradient of a scaled W vanishes along W (scale invariance), as with torch's own SN."""
    torch.manual_seed(0)
    layer = SpectralNormLinear(16, 16, bias=False).eval()
    x = torch.randn(8, 16)
    layer(x).pow(2).sum().backward()
    radial = (layer.weight.grad * layer.weight).sum()
    assert abs(radial.item()) < 1e-4 * layer.weight.grad.norm().item() * layer.weight.norm().item() + 1e-6


# --- STAM (Eq. 7, 9) against Tune-A-Video's TA: the covariate-shift argument of section 4.3 ---------------------------
# (Proposition 1 (i) is checked through ei2's own attention in tests/test_equations.py.)


def gaussian_frames(N: int, n: int, d: int, seed: int):
    """N spatial locations, each n frames drawn i.i.d. from N(mu, Sigma) with a mean far from zero."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g) * 0.8 + 0.3
    A = torch.randn(d, d, generator=g) / d**0.5
    z = mu + torch.randn(N, n, d, generator=g) @ A.t() * 0.5
    return z, mu


def run_temporal(norm, attn, z):
    with torch.no_grad():
        return z + attn(norm(z))


def test_stam_keeps_mean_and_bounds_covariance():
    """Eq. 9 with Eq. 6 and 8: STAM's output mean is mu + b and ||Sigma_out|| <= 2 ||Sigma_in|| (spectral norm).

    IC removes the temporal mean, so V has mean zero whatever W_v is; with b set to a known vector the shift is b.
    Tolerance: the mean's Monte Carlo error over 40k location-frames is about 0.005; 0.02 is used."""
    torch.manual_seed(0)
    d, n = 32, 8
    norm, attn = temporal_module("stam", d, heads=4)
    for p in (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, attn.to_out[0].weight):  # "tuned": large weights
        p.data.mul_(20.0)
    for m in (attn.to_v, attn.to_out[0]):
        m.converge()
    b = torch.linspace(-0.3, 0.3, d)
    attn.to_out[0].bias.data.copy_(b)
    attn.eval()
    z, mu = gaussian_frames(5000, n, d, seed=1)
    out = run_temporal(norm, attn, z)
    shift = out.reshape(-1, d).mean(0) - z.reshape(-1, d).mean(0)
    assert (shift - b).abs().max() < 0.02
    cov_in = torch.cov(z.reshape(-1, d).t())
    cov_out = torch.cov(out.reshape(-1, d).t())
    ratio = torch.linalg.matrix_norm(cov_out, ord=2) / torch.linalg.matrix_norm(cov_in, ord=2)
    assert ratio <= 2.0
    # Eq. 7: ||Sigma' - Sigma|| <= ||W_L||^2 ||W_v||^2 ||Sigma_IC(z)|| with ||W̄|| = 1 (spectral norms, with slack 1.05
    # for the sample covariance); IC keeps the temporal covariance, Sigma_IC(z) <= Sigma.
    change = torch.linalg.matrix_norm(cov_out - cov_in, ord=2)
    assert change <= 1.05 * 2 * torch.linalg.matrix_norm(cov_in, ord=2)


def test_layernorm_ta_shifts_the_mean_where_stam_does_not():
    """Section 4.3: LayerNorm centers over channels, not frames, so TA's V keeps a non-zero mean and its output mean
    moves by W_L^T mu_V; STAM with the same (non-zero, "tuned") weights and b = 0 leaves it where it was."""
    torch.manual_seed(0)
    d, n = 32, 8
    z, _ = gaussian_frames(5000, n, d, seed=2)
    ta_norm, ta = temporal_module("ta", d, heads=4)
    st_norm, st = temporal_module("stam", d, heads=4)
    g = torch.Generator().manual_seed(5)
    for a in (ta, st):  # the same weights in both, as after tuning; b = 0 in both
        for name in ("to_q", "to_k", "to_v"):
            getattr(a, name).weight.data.copy_(torch.randn(d, d, generator=torch.Generator().manual_seed(hash(name) % 1000)) / d**0.5)
        a.to_out[0].weight.data.copy_(torch.randn(d, d, generator=g) / d**0.5 if a is ta else ta.to_out[0].weight.data)
        a.to_out[0].bias.data.zero_()
    for m in (st.to_v, st.to_out[0]):
        m.converge()
    ta.eval(), st.eval()
    mean_in = z.reshape(-1, d).mean(0)
    ta_shift = (run_temporal(ta_norm, ta, z).reshape(-1, d).mean(0) - mean_in).norm()
    st_shift = (run_temporal(st_norm, st, z).reshape(-1, d).mean(0) - mean_in).norm()
    assert st_shift < 0.02, st_shift
    assert ta_shift > 0.5, ta_shift  # measured about 1.3 here: 60x STAM's Monte Carlo noise floor
    # the mechanism: after LayerNorm the temporal mean mu_rv(z) is far from zero, after IC it is zero
    assert ta_norm(z).mean(dim=1).abs().mean() > 0.3
    assert st_norm(z).mean(dim=1).abs().max() < 1e-5


def test_stam_is_identity_for_one_frame():
    norm, attn = temporal_module("stam", 16, heads=2)
    z = torch.randn(10, 1, 16)
    assert torch.equal(run_temporal(norm, attn, z), z)


def test_tune_a_video_ta_initialization():
    """TA: LayerNorm, zero output weight, default (non-zero) output bias, no spectral norm."""
    norm, attn = temporal_module("ta", 64)
    assert isinstance(norm, torch.nn.LayerNorm)
    assert torch.count_nonzero(attn.to_out[0].weight) == 0
    assert torch.count_nonzero(attn.to_out[0].bias) > 0
    assert type(attn.to_v) is torch.nn.Linear


def naive_temporal_attention(attn, zhat: torch.Tensor, heads: int) -> torch.Tensor:
    """Linear(Attention(ẑ, ẑ)) over the n frames, head by head: each head h sees channels [h d/H, (h+1) d/H) of Q, K,
    V and scales by sqrt(d/H); the heads' outputs are concatenated before the output map."""
    q, k, v = attn.to_q(zhat), attn.to_k(zhat), attn.to_v(zhat)  # (N, n, d)
    dh = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        outs.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5, dim=-1) @ v[..., sl])
    return attn.to_out[0](torch.cat(outs, dim=-1))


@pytest.mark.parametrize("temporal", ["stam", "ta"])
def test_temporal_heads_follow_the_config(temporal):
    """Tune-A-Video's attn_temp has the level's head count (SD v1's attention_head_dim, the number of heads: 8 for
    SD v1-4, 2 in UNetConfig.tiny()), not a fixed 8; the module computes that many heads."""
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    m = UNet(cfg, VideoOptions(temporal=temporal)).eval()
    blocks = [mod for name, mod in m.named_modules() if name.endswith("transformer_blocks.0")]
    assert len(blocks) == 16 and all(b.attn_temp.heads == cfg.attention_head_dim == 2 for b in blocks)
    block = blocks[0]
    with torch.no_grad():
        block.attn_temp.to_out[0].weight.normal_()  # TA's starts at zero
        zhat = block.norm_temp(torch.randn(6, 5, 32))  # (locations, n, d)
        got = block.attn_temp(zhat)
        assert torch.allclose(got, naive_temporal_attention(block.attn_temp, zhat, 2), atol=1e-5)
        assert not torch.allclose(got, naive_temporal_attention(block.attn_temp, zhat, 8), atol=1e-3)


@pytest.mark.parametrize("norm_kind", ["layernorm", "layernorm_noaffine", "none", "instancenorm", "ic"])
@pytest.mark.parametrize("sn", [False, True])
def test_fig4_variants(norm_kind, sn):
    """Every Fig. 4 temporal normalization, with and without spectral norm, builds and runs; the normalization does
    what its name says on a hand-checkable property."""
    norm, attn = temporal_module("stam", 16, heads=2, norm=norm_kind, spectral_norm=sn)
    z = torch.randn(6, 4, 16) * 2 + 1
    zn = norm(z)
    if norm_kind in ("ic", "instancenorm"):
        assert zn.mean(dim=1).abs().max() < 1e-5
    if norm_kind == "instancenorm":
        assert torch.allclose(zn.var(dim=1, correction=0), torch.ones(6, 16), atol=1e-3)
    if norm_kind.startswith("layernorm"):
        assert zn.mean(dim=-1).abs().max() < 1e-5
    if norm_kind == "none":
        assert torch.equal(zn, z)
    assert (type(attn.to_v).__name__ == "SpectralNormLinear") == sn
    assert run_temporal(norm, attn, z).shape == z.shape


# --- Eq. 10: FFAM -----------------------------------------------------------------------------------------------------


def test_fine_coarse_context_layout_by_hand():
    """2 frames of a 2x2 grid, r = 2: frame i keeps its 4 tokens, then token (0, 0) of the other frame."""
    z = torch.arange(2 * 2 * 2, dtype=torch.float32).view(1, 2, 2, 2, 1)  # frame 0: 0..3, frame 1: 4..7
    ctx = fine_coarse_context(z, 2)
    assert ctx.shape == (1, 2, 5, 1)
    assert ctx[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert ctx[0, 1, :, 0].tolist() == [4, 5, 6, 7, 0]


@pytest.mark.parametrize("n,h,w,r", [(8, 8, 8, 2), (4, 16, 8, 4), (3, 6, 6, 3)])
def test_ffam_key_length(n, h, w, r):
    """Eq. 10: z_FC has l + (n - 1) l / r^2 tokens when r divides h and w."""
    l = h * w
    ctx = fine_coarse_context(torch.randn(2, n, h, w, 5), r)
    assert ctx.shape == (2, n, l + (n - 1) * l // r**2, 5)


def test_ffam_key_length_ragged():
    """Sizes r does not divide keep ceil(h/r) * ceil(w/r) tokens per other frame (strided slice [::r, ::r])."""
    ctx = fine_coarse_context(torch.randn(1, 3, 5, 7, 2), 2)
    assert ctx.shape[2] == 35 + 2 * 3 * 4


def naive_ffam(attn: FrameAttention, x: torch.Tensor, n: int, h: int, w: int, r: int) -> torch.Tensor:
    """Eq. 10 frame by frame, written as plainly as possible."""
    b = x.shape[0] // n
    frames = x.view(b, n, h, w, -1)
    outs = []
    for bi in range(b):
        for i in range(n):
            parts = [frames[bi, i].reshape(h * w, -1)]
            parts += [frames[bi, j, ::r, ::r].reshape(-1, frames.shape[-1]) for j in range(n) if j != i]
            c = torch.cat(parts)[None]
            q, k, v = attn.to_q(frames[bi, i].reshape(1, h * w, -1)), attn.to_k(c), attn.to_v(c)
            outs.append(attn.to_out[0](attention(q, k, v, attn.heads)))
    return torch.cat(outs)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_ffam_equals_naive_loop(r):
    torch.manual_seed(0)
    n, h, w, d = 4, 8, 8, 16
    attn = FrameAttention(d, 4, mode="ffam", ratio=r)
    x = torch.randn(2 * n, h * w, d)
    with torch.no_grad():
        assert torch.allclose(attn(x, n, (h, w)), naive_ffam(attn, x, n, h, w, r), atol=1e-5)


def test_ffam_one_frame_is_self_attention():
    torch.manual_seed(0)
    attn = FrameAttention(16, 4, mode="ffam", ratio=2)
    x = torch.randn(3, 36, 16)
    with torch.no_grad():
        expected = attn.to_out[0](attention(attn.to_q(x), attn.to_k(x), attn.to_v(x), 4))
        assert torch.allclose(attn(x, 1, (6, 6)), expected, atol=1e-6)


def test_ffam_r1_is_full_attention():
    torch.manual_seed(0)
    n, h, w = 4, 4, 4
    ffam = FrameAttention(16, 4, mode="ffam", ratio=1)
    full = FrameAttention(16, 4, mode="full")
    full.load_state_dict(ffam.state_dict())
    x = torch.randn(2 * n, h * w, 16)
    with torch.no_grad():
        assert torch.allclose(ffam(x, n, (h, w)), full(x, n, (h, w)), atol=1e-5)


def test_sca_keys_by_hand():
    """Tune-A-Video's SCA: frame i attends to [frame 0 ; frame i-1], frame 0 to itself twice."""
    z = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1)  # 4 frames, one token each
    ctx = sparse_causal_context(z)
    assert ctx[0, :, :, 0].tolist() == [[0, 0], [0, 0], [0, 1], [0, 2]]


# --- The inflated UNet -------------------------------------------------------------------------------------------------


def test_inflated_unet_one_frame_equals_image_sd():
    """With one frame, FFAM is self-attention and STAM is the identity (IC of one frame is zero, b = 0), so the EI²
    UNet at creation is SD's image UNet on the same weights."""
    cfg = UNetConfig.tiny()
    ref = diffusers_unet(cfg, seed=3)
    ours = UNet(cfg, VideoOptions(frame_attention="ffam", ratio=2, temporal="stam")).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = ref(x, 300, ctx).sample
        got = ours(x[:, :, None], 300, ctx)[:, :, 0]
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-5


def test_video_modules_see_other_frames():
    """With several frames FFAM and STAM mix frames: changing frame 2 changes frame 0's output; "self" + no temporal
    module + per-frame norms does not."""
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    x, ctx = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 32)
    x2 = x.clone()
    x2[:, :, 2] += 1.0
    for options, mixes in [(VideoOptions(), True), (VideoOptions("self", temporal="none", resnet_norm="frame"), False)]:
        m = UNet(cfg, options).eval()
        with torch.no_grad():
            delta = (m(x, 10, ctx)[:, :, 0] - m(x2, 10, ctx)[:, :, 0]).abs().max().item()
        assert (delta > 1e-4) == mixes, (options, delta)


def expected_trainable(cfg: UNetConfig) -> int:
    """Hand count: per transformer block of width d, attn1.to_q and attn2.to_q are d x d, the temporal attention has
    W_q, W_k, W_v, W_L (d x d each) and b (d): 6 d^2 + d. SD v1 has 2 blocks per down level, 1 in the middle and 3 per
    up level, at the widths of the levels with attention."""
    widths = [c for c, a in zip(cfg.block_out_channels, cfg.cross_attention) if a]
    blocks = [(d, cfg.layers_per_block + cfg.layers_per_block + 1) for d in widths] + [(cfg.block_out_channels[-1], 1)]
    return sum(k * (6 * d * d + d) for d, k in blocks)


@pytest.mark.parametrize("temporal", ["stam", "ta"])
def test_trainable_set_full_sd(temporal):
    """Section 5: W_Q of FFAM and of cross-attention plus every temporal-attention parameter: 74,354,880 at SD v1-4
    (Tune-A-Video's figure, "about 74.4 M")."""
    torch.manual_seed(0)
    m = UNet(UNetConfig(), VideoOptions(temporal=temporal))
    count = mark_trainable(m)
    assert count == expected_trainable(UNetConfig()) == 74_354_880
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.endswith(("attn1.to_q.weight", "attn2.to_q.weight")) or ".attn_temp." in n for n in names)
    assert sum(n.endswith("attn1.to_q.weight") for n in names) == 16
    assert sum(".attn_temp.to_out.0.bias" in n for n in names) == 16
    assert not any("norm_temp" in n for n in names)  # TA's LayerNorm affine stays frozen, as in Tune-A-Video
    assert is_trainable_key("down_blocks.0.attentions.0.transformer_blocks.0.attn_temp.to_v.weight")
    assert not is_trainable_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight")


@pytest.mark.parametrize("temporal", ["ta", "stam"])
@pytest.mark.parametrize("on", [False, True])
def test_trainable_set_with_the_temporal_norm(temporal, on):
    """temporal_norm_trainable (Fig. 4's "LayerNorm" row) adds the temporal LayerNorm's weight and bias, d + d per
    block, to section 5's set; off (Tune-A-Video) they stay frozen. STAM's IC has no parameters: nothing to add.
    Hand count at the tiny config: blocks of width 32 (5), 64 (5 + 5) and the middle one (64)."""
    cfg = UNetConfig.tiny()
    m = UNet(cfg, VideoOptions(temporal=temporal, temporal_norm_trainable=on))
    base = 5 * (6 * 32**2 + 32) + 11 * (6 * 64**2 + 64)
    assert base == expected_trainable(cfg) == 301_920
    norms = 5 * 2 * 32 + 11 * 2 * 64 if on and temporal == "ta" else 0  # 1,728
    assert mark_trainable(m) == base + norms
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert sum(".norm_temp." in n for n in trainable) == (32 if on and temporal == "ta" else 0)
    assert not any(".norm1." in n or ".norm2." in n or ".norm3." in n or "conv_norm_out" in n for n in trainable)
