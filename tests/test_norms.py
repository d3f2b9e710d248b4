"""ei2.norms: GroupNorm and LayerNorm that keep a bf16 input in bf16 under autocast, against the fp32 computation."""

import torch
import torch.nn.functional as F
from torch import nn

from ei2.norms import GroupNorm, LayerNorm


def _pairs():
    g = torch.Generator().manual_seed(0)
    gn, ref_gn = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    ln, ref_ln = LayerNorm(16), nn.LayerNorm(16)
    with torch.no_grad():
        for a, b in ((gn, ref_gn), (ln, ref_ln)):
            a.weight.copy_(1 + 0.1 * torch.randn(16, generator=g))
            a.bias.copy_(0.1 * torch.randn(16, generator=g))
            b.load_state_dict(a.state_dict())
    x_gn = 0.3 + 2 * torch.randn(2, 16, 5, 5, generator=g)
    x_ln = 0.3 + 2 * torch.randn(2, 7, 16, generator=g)
    return [(gn, ref_gn, x_gn), (ln, ref_ln, x_ln)]


def test_fp32_is_the_plain_module():
    for ours, ref, x in _pairs():
        assert torch.equal(ours(x), ref(x))
        assert list(ours.state_dict()) == ["weight", "bias"]  # checkpoint names unchanged


def test_bf16_input_stays_bf16_with_fp32_statistics():
    """Under bf16 autocast a bf16 input gives a bf16 output equal to the fp32 norm of the same input up to a few bf16
    ulps of the output's scale: the CPU kernels apply the affine map in bf16 (measured 0.0154 at outputs up to 4.13
    for GroupNorm, 0.0161 up to 2.66 for LayerNorm); bound 2^-7 of the largest |output|. Gradients reach the fp32
    affine parameters (Tune-A-Video's trainable LayerNorm). A mean large against the spread: the next test."""
    for ours, ref, x in _pairs():
        xb = x.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(xb)
        assert out.dtype == torch.bfloat16
        want = ref(xb.float()).detach()  # fp32 statistics and affine on the same (bf16-valued) input
        err = (out.float() - want).abs().max()
        assert err <= 2**-7 * want.abs().max(), (err, want.abs().max())
        out.float().sum().backward()
        assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
        assert torch.isfinite(ours.weight.grad).all()


def test_group_norm_statistics_are_not_bf16_rounded():
    """The kernel accumulates in fp32: a bf16 input whose mean is large against its spread (where bf16 sums would
    lose the spread) still normalizes to unit variance."""
    x = (100 + torch.randn(1, 8, 64, 64, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    gn = GroupNorm(2, 8, affine=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x).float()
    var = y.var(dim=(2, 3)).mean().item()
    assert abs(var - 1) < 0.05, var
    assert torch.allclose(y, F.group_norm(x.float(), 2), atol=0.05)
